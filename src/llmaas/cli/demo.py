"""`llmaas demo`: start the service, and show two apps holding separate persistent contexts.

Starts `llmaas serve` as its own process on a data directory (a fresh temporary one unless --home), registers two
apps, has each keep a context across two calls, shows that neither can see the other's, prints what each app sees
of the service (its calls, its contexts' resident KV), stops the service, and says how to go on. The temporary
directory is removed at the end, also on an error or Ctrl-C, unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from llmaas.cli import plural
from llmaas.cli.chat import print_streamed
from llmaas.client import Client, ServiceError
from llmaas.paths import DataDir
from llmaas.service.process import start_service, stop_service
from llmaas.storage.catalog import Catalog

# Chosen so that the 135M model visibly recalls the first turn in the second with its system prompt in place (tried
# greedily: it declines to "remember" a locker code, and a "travel assistant" persona drifts into Portuguese).
CONVERSATIONS = {
    "notes": ("You are a note-taking assistant. Keep answers short.",
              ["Note: the meeting is on Friday at 10am.", "When is the meeting?"]),
    "travel": ("You are a helpful assistant. Keep answers short.",
               ["I want to visit Lisbon in May.", "Which city do I want to visit?"]),
}


@contextlib.contextmanager
def demo_home(home: str | None, keep: bool) -> Iterator[DataDir]:
    """The data directory `home`, or a fresh temporary one that is removed on leaving (whatever the reason: the end,
    an error, Ctrl-C) unless `keep`. A directory the user named is never removed."""
    if home is not None:
        yield DataDir(Path(home)).create()
        return
    root = Path(tempfile.mkdtemp(prefix="llmaas-demo-"))
    try:
        yield DataDir(root).create()
    finally:
        if not keep:
            shutil.rmtree(root)


def command_name() -> str:
    """How to type `llmaas` here: the bare name when it is on PATH, else the script beside this Python (the
    README's set-up leaves it in .venv/bin without activating the environment)."""
    script = Path(sys.executable).parent / "llmaas"
    on_path = shutil.which("llmaas")
    if not script.exists() or (on_path is not None and Path(on_path).resolve() == script.resolve()):
        return "llmaas"
    return os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)


def next_steps(home: DataDir, kept: bool) -> str:
    """What to run after the demo: on the demo's own data if it is kept, else on the default data directory."""
    cmd, at = command_name(), f" --home {home.root}" if kept else ""
    steps = [(f"{cmd} apps{at} add NAME", "register your app; prints the key it calls the API with"),
             (f"{cmd} serve{at}", "run the service and leave it running"),
             (f"{cmd} chat{at}", "in another terminal: talk on a context you can resume later")]
    width = max(len(command) for command, _ in steps)
    where = (f"the demo's data is kept in {home.root}; to go on with it:" if kept else
             "the demo's temporary data is removed (--keep keeps it). To go on, on your own data directory "
             "($LLMAAS_HOME, default ~/.local/share/llmaas):")
    return "\n".join([where] + [f"  {command:<{width}}  # {why}" for command, why in steps])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas demo", description=__doc__)
    p.add_argument("--home", help="data directory, kept afterwards (default: a temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory (default: remove it)")
    p.add_argument("--max-tokens", type=int, default=48, help="longest reply (default: 48)")
    args = p.parse_args(argv)
    with demo_home(args.home, args.keep) as home:
        run(home, args.max_tokens)
        steps = next_steps(home, kept=args.home is not None or args.keep)
    print(f"\n{steps}")
    return 0


def run(home: DataDir, max_tokens: int) -> None:
    """The demo proper: a service on `home`, two apps, two turns each, isolation, each app's stats, then the service
    stopped."""
    catalog = Catalog(home.catalog)
    keys = {name: catalog.add_app(f"{name}-{int(time.time())}")[1] for name in CONVERSATIONS}
    catalog.close()
    print(f"starting the service on {home.root} ...", flush=True)
    service = start_service(home, [])
    try:
        clients = {name: Client(key, socket=home.socket) for name, key in keys.items()}
        contexts = {name: clients[name].new_context(CONVERSATIONS[name][0]) for name in CONVERSATIONS}
        for turn in range(2):
            for name, client in clients.items():  # the apps take turns: every call switches context
                prompt = CONVERSATIONS[name][1][turn]
                print(f"\n[{name} · {contexts[name]}] user: {prompt}\n[{name}] assistant: ", end="", flush=True)
                print_streamed(client.stream(contexts[name], prompt, max_tokens=max_tokens))
        print("\nisolation:")
        for name, client in clients.items():
            other = next(n for n in contexts if n != name)
            try:
                client.get(contexts[other])
                print(f"  {name} can read {other}'s context: THIS IS A BUG")
            except ServiceError as exc:
                print(f"  {name} asking for {other}'s context -> {exc.status} {exc.kind}")
            print(f"  {name} sees its own: {[c['id'] for c in client.list()]}")
        print("\nwhat each app sees of the service (its own calls and contexts, nothing of the other's):")
        for name, client in clients.items():
            stats = client.stats()
            resident_bytes = sum(c["resident_bytes"] for c in stats["contexts"])
            print(f"  {name}: {plural(stats['app']['calls'], 'call')}, {plural(len(stats['contexts']), 'context')}, "
                  f"KV resident {resident_bytes / 2**20:.2f} MiB")
    finally:
        stop_service(service)
    print("service stopped.")
