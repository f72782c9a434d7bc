"""`llmaas chat`: talk to the running service from a terminal, on a persistent context you can resume later.

Commands inside: /new (new context), /list, /switch ID, /history, /delete (asks first), /exit (or Ctrl-D).
Arrow keys edit the line and recall earlier lines (kept across sessions in the data directory's chat_history).
Ctrl-C stops a reply as it streams (the service cancels the call and keeps nothing of that turn); at the prompt it
exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Generator, Iterable
from pathlib import Path

from llmaas.cli import plural
from llmaas.client import CallReply, Client, ServiceError
from llmaas.errors import LlmaasError
from llmaas.paths import DataDir
from llmaas.storage.catalog import Catalog

TERMINAL_APP = "terminal"
COMMANDS_HELP = "/new /list /switch ID /history /delete /exit"
HISTORY_LINES = 1000


def terminal_key(home: DataDir) -> str:
    """The key of the app this command registers for itself on first use, kept in the data directory (0600)."""
    if home.terminal_key.exists():
        return home.terminal_key.read_text().strip()
    catalog = Catalog(home.catalog)
    try:
        _, key = catalog.add_app(TERMINAL_APP)
    except LlmaasError as exc:
        raise LlmaasError(f"{exc}; pass --key, or remove the app with `llmaas apps remove {TERMINAL_APP}`") from exc
    finally:
        catalog.close()
    home.terminal_key.touch(mode=0o600)
    home.terminal_key.write_text(key + "\n")
    return key


def ask(prompt: str) -> str | None:
    """A line typed at `prompt`, stripped; None when the user ends input (Ctrl-D) or interrupts it (Ctrl-C)."""
    try:
        return input(prompt).strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def enable_line_editing(history: Path) -> Path | None:
    """Arrow keys, line editing and history for input(), the history read from `history`; returns where to save it
    on exit, or None when stdin is not a terminal (piped input must not be echoed into the history)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline  # imported for its side effect on input(); absent on Pythons built without it
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LINES)
    if history.exists():
        readline.read_history_file(history)
    return history


def save_history(history: Path) -> None:
    import readline

    readline.write_history_file(history)
    history.chmod(0o600)  # what was typed is as private as the conversations


def pick_context(client: Client, args: argparse.Namespace) -> str | None:
    """The context to talk on (None: the user left at the question)."""
    if args.context:
        client.get(args.context)  # fails clearly if unknown
        return args.context
    contexts = client.list()
    if args.new or not contexts:
        return client.new_context(args.system)
    print("your contexts:")
    for i, c in enumerate(contexts, 1):
        last = next((m["content"] for m in reversed(c["messages"]) if m["role"] == "user"), "(empty)")
        print(f"  {i}. {c['id']}  {plural(c['num_calls'], 'call')}  last: {last[:50]!r}")
    choice = ask("resume which (number), or n for a new one? ")
    if choice is None:
        return None
    if choice.isdigit() and 1 <= int(choice) <= len(contexts):
        return contexts[int(choice) - 1]["id"]
    return client.new_context(args.system)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", help="data directory of the service (default: $LLMAAS_HOME or ~/.local/share/llmaas)")
    p.add_argument("--key", default=os.environ.get("LLMAAS_KEY"),
                   help="app key (default: $LLMAAS_KEY, else a 'terminal' app registered on first use)")
    p.add_argument("--url", help="service URL if not the data directory's Unix socket, e.g. http://127.0.0.1:8080")
    p.add_argument("--context", help="resume this context id")
    p.add_argument("--new", action="store_true", help="start a new context")
    p.add_argument("--system", help="system prompt for a new context (default: none)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply (default: 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    args = p.parse_args(argv)
    home = DataDir.resolve(args.home)
    client = Client(args.key or terminal_key(home), socket=home.socket, base_url=args.url)
    ctx = pick_context(client, args)  # first: a service that is not running fails here, before any history IO
    if ctx is None:
        return 0
    print(f"context {ctx} — {COMMANDS_HELP}")
    history = enable_line_editing(home.chat_history)
    try:
        converse(client, ctx, args)
    finally:
        if history is not None:
            save_history(history)
    return 0


def converse(client: Client, ctx: str, args: argparse.Namespace) -> None:
    """Read lines until /exit, Ctrl-D or Ctrl-C at the prompt; a refused request is reported and the chat goes on."""
    while (line := ask("> ")) is not None:
        if not line:
            continue
        try:
            next_ctx = _command(client, ctx, line, args) if line.startswith("/") else _say(client, ctx, line, args)
        except ServiceError as exc:
            print(f"[{exc}]", file=sys.stderr)
            continue
        if next_ctx is None:
            return
        ctx = next_ctx


def print_streamed(pieces: Iterable[str | CallReply]) -> CallReply:
    """Print a streamed reply as it arrives, then its timings; returns the final CallReply."""
    reply = None
    for piece in pieces:
        if isinstance(piece, str):
            print(piece, end="", flush=True)
        else:
            reply = piece
    assert reply is not None
    t = reply.timings
    print(f"\n    (switch {t['switch_s'] * 1000:.0f} ms, TTFT {t['ttft_s'] * 1000:.0f} ms, "
          f"{t['decode_tok_s']:.0f} tok/s, context {plural(reply.usage['context_tokens'], 'token')})")
    if reply.notice:  # e.g. the context is full: say what to do now, not after the next line is refused
        print(f"    [{reply.notice}; /new starts one]")
    return reply


def _say(client: Client, ctx: str, line: str, args: argparse.Namespace) -> str:
    pieces: Generator[str | CallReply, None, None] = client.stream(
        ctx, line, max_tokens=args.max_tokens, temperature=args.temperature)
    try:
        print_streamed(pieces)
    except KeyboardInterrupt:
        # Closing the generator closes the HTTP stream: the service sees the client go, cancels the generation and
        # commits nothing of this turn, so the context is as it was before the line was sent.
        pieces.close()
        print("\n[stopped: this turn is not kept]")
    return ctx


def _command(client: Client, ctx: str, line: str, args: argparse.Namespace) -> str | None:
    """Run one /command; returns the context to go on with, or None to leave the chat."""
    cmd, _, arg = line.partition(" ")
    if cmd == "/exit":
        return None
    if cmd == "/new":
        ctx = client.new_context(args.system)
    elif cmd == "/list":
        for c in client.list():
            print(f"  {c['id']}  {plural(c['num_calls'], 'call')}, {plural(c['num_tokens'], 'token')}"
                  + ("  <-" if c["id"] == ctx else ""))
    elif cmd == "/switch":
        client.get(arg.strip())
        ctx = arg.strip()
    elif cmd == "/history":
        for m in client.get(ctx)["messages"]:
            print(f"  {m['role']}: {m['content']}")
    elif cmd == "/delete":
        if (ask(f"delete context {ctx} and all its messages? [y/N] ") or "").lower() not in ("y", "yes"):
            print("not deleted.")
            return ctx
        client.delete(ctx)
        ctx = client.new_context(args.system)
    else:
        print(f"commands: {COMMANDS_HELP}")
        return ctx
    print(f"context {ctx}")
    return ctx
