"""`llmaas demo`: start the service, and show two apps holding separate persistent contexts.

Starts `llmaas serve` as its own process on a data directory (a fresh temporary one unless --home), registers two
apps, has each keep a context across two calls, shows that neither can see the other's, prints the service's view
(residency, switch latency), and stops the service.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmaas.cli.chat import print_streamed
from llmaas.client import Client, ServiceError
from llmaas.storage.catalog import Catalog
from llmaas.storage.paths import DataDir

CONVERSATIONS = {
    "notes": ("You are a note-taking assistant. Answer briefly.",
              ["Please remember this: my locker code is 4512.", "What is my locker code?"]),
    "travel": ("You are a travel assistant. Answer briefly.",
               ["I am planning a trip to Lisbon in May.", "Which city am I planning to visit?"]),
}


def start_service(home: DataDir, extra: list[str], timeout_s: float = 300.0) -> subprocess.Popen:
    """`llmaas serve` in a child process, returned once it answers on its socket."""
    proc = subprocess.Popen([sys.executable, "-m", "llmaas", "serve", "--home", str(home.root), "--quiet", *extra])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmaas demo: the service exited with code {proc.returncode}")
        try:
            Client("probe", socket=home.socket).list()
        except ServiceError as exc:
            if exc.status == 401:  # it answers (and refuses the probe key): ready
                return proc
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("llmaas demo: the service did not start in time")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas demo", description=__doc__)
    p.add_argument("--home", help="data directory (default: a fresh temporary one)")
    p.add_argument("--max-tokens", type=int, default=48, help="longest reply (default: 48)")
    args = p.parse_args(argv)
    home = DataDir(Path(args.home or tempfile.mkdtemp(prefix="llmaas-demo-"))).create()
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
                print_streamed(client.stream(contexts[name], prompt, max_tokens=args.max_tokens))
        print("\nisolation:")
        for name, client in clients.items():
            other = next(n for n in contexts if n != name)
            try:
                client.get(contexts[other])
                print(f"  {name} can read {other}'s context: THIS IS A BUG")
            except ServiceError as exc:
                print(f"  {name} asking for {other}'s context -> {exc.status} {exc.kind}")
            print(f"  {name} sees its own: {[c['id'] for c in client.list()]}")
        stats = clients["notes"].stats()["engine"]
        print(f"\nservice: {stats['calls']} calls, KV resident {stats['kv_resident_bytes'] / 2**20:.1f} MiB of a "
              f"{stats['kv_budget_bytes'] / 2**20:.0f} MiB budget; contexts persist in {home.catalog}")
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    print("service stopped.")
    return 0
