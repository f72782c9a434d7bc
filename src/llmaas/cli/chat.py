"""`llmaas chat`: talk to the running service from a terminal, on a persistent context you can resume later.

Commands inside: /new (new context), /list, /switch ID, /history, /delete, /exit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from llmaas.client import CallReply, Client, ServiceError
from llmaas.errors import LlmaasError
from llmaas.storage.catalog import Catalog
from llmaas.storage.paths import DataDir

TERMINAL_APP = "terminal"


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


def pick_context(client: Client, args: argparse.Namespace) -> str:
    if args.context:
        client.get(args.context)  # fails clearly if unknown
        return args.context
    contexts = client.list()
    if args.new or not contexts:
        return client.new_context(args.system)
    print("your contexts:")
    for i, c in enumerate(contexts, 1):
        last = next((m["content"] for m in reversed(c["messages"]) if m["role"] == "user"), "(empty)")
        print(f"  {i}. {c['id']}  {c['num_calls']} calls  last: {last[:50]!r}")
    choice = input("resume which (number), or n for a new one? ").strip().lower()
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
    p.add_argument("--system", help="system prompt for a new context")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply (default: 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    args = p.parse_args(argv)
    home = DataDir.resolve(args.home)
    client = Client(args.key or terminal_key(home), socket=home.socket, base_url=args.url)
    ctx = pick_context(client, args)
    print(f"context {ctx} — /new /list /switch ID /history /delete /exit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        try:
            ctx = _command(client, ctx, line, args) if line.startswith("/") else _say(client, ctx, line, args)
        except ServiceError as exc:
            print(f"[{exc}]", file=sys.stderr)
        if ctx is None:
            return 0


def print_streamed(pieces: Iterator[str | CallReply]) -> CallReply:
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
          f"{t['decode_tok_s']:.0f} tok/s, context {reply.usage['context_tokens']} tokens)")
    return reply


def _say(client: Client, ctx: str, line: str, args: argparse.Namespace) -> str:
    print_streamed(client.stream(ctx, line, max_tokens=args.max_tokens, temperature=args.temperature))
    return ctx


def _command(client: Client, ctx: str, line: str, args: argparse.Namespace) -> str | None:
    cmd, _, arg = line.partition(" ")
    if cmd == "/exit":
        return None
    if cmd == "/new":
        ctx = client.new_context(args.system)
    elif cmd == "/list":
        for c in client.list():
            print(f"  {c['id']}  {c['num_calls']} calls, {c['num_tokens']} tokens" + ("  <-" if c["id"] == ctx else ""))
    elif cmd == "/switch":
        client.get(arg.strip())
        ctx = arg.strip()
    elif cmd == "/history":
        for m in client.get(ctx)["messages"]:
            print(f"  {m['role']}: {m['content']}")
    elif cmd == "/delete":
        client.delete(ctx)
        ctx = client.new_context(args.system)
    else:
        print("commands: /new /list /switch ID /history /delete /exit")
        return ctx
    print(f"context {ctx}")
    return ctx
