"""`llmaas apps add|list|remove|rotate-key`: register the apps that may use the service and issue their keys.

Works on the catalogue directly, so it runs whether or not the service does; a running service sees each change at
once (keys are looked up per request), and after `remove` it is asked over its Unix socket to drop the app's KV from
memory and disk.
"""

from __future__ import annotations

import argparse

import httpx

from llmaas.cli import plural
from llmaas.paths import DataDir
from llmaas.storage.catalog import DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_MAX_CONTEXTS, Catalog

SERVE_DEFAULT_MAX_CONTEXT_TOKENS = 2048  # `llmaas serve --max-context-tokens`'s default: the cap on every quota


def main(argv: list[str]) -> int:
    home_help = "data directory (default: $LLMAAS_HOME or ~/.local/share/llmaas)"
    p = argparse.ArgumentParser(prog="llmaas apps", description=__doc__)
    p.add_argument("--home", help=home_help)
    # --home also after the action (`llmaas apps add NAME --home DIR`); SUPPRESS keeps an earlier one otherwise
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", default=argparse.SUPPRESS, help=home_help)
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", parents=[home], help="register an app and print its key (shown once)")
    add.add_argument("name")
    add.add_argument("--max-contexts", type=int, default=DEFAULT_MAX_CONTEXTS,
                     help=f"contexts the app may hold (default: {DEFAULT_MAX_CONTEXTS})")
    add.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS,
                     help=f"tokens per context, prompt and replies (default: {DEFAULT_MAX_CONTEXT_TOKENS}); the "
                          "service caps it at its own --max-context-tokens and the model's length")
    add.add_argument("--max-pending", type=int,
                     help="calls the app may have waiting before it gets 429 (default: the service's --max-queue)")
    sub.add_parser("list", parents=[home], help="list apps with their quotas and number of contexts")
    remove = sub.add_parser("remove", parents=[home], help="remove an app and all its contexts (and their KV, at once)")
    remove.add_argument("name")
    rotate = sub.add_parser("rotate-key", parents=[home], help="give an app a new key; the old one is refused at once")
    rotate.add_argument("name")
    args = p.parse_args(argv)
    data = DataDir.resolve(args.home).create()
    catalog = Catalog(data.catalog)
    try:
        if args.action == "add":
            app, key = catalog.add_app(args.name, args.max_contexts, args.max_context_tokens, args.max_pending)
            print(f"app {app.name!r} added; its key (shown only now; the service stores a hash):\n{key}")
            if app.max_context_tokens > SERVE_DEFAULT_MAX_CONTEXT_TOKENS:
                print(f"note: {app.max_context_tokens} tokens is over the service's default limit of "
                      f"{SERVE_DEFAULT_MAX_CONTEXT_TOKENS}: contexts get min(this, `serve --max-context-tokens`, the "
                      "model's length); each context reports its effective limit as max_tokens")
        elif args.action == "list":
            _list(catalog)
        elif args.action == "rotate-key":
            key = catalog.rotate_key(args.name)
            print(f"app {args.name!r} has a new key (the old one is refused from now on):\n{key}")
        else:
            removed = catalog.remove_app(args.name)
            print(f"app {args.name!r} removed with {plural(len(removed), 'context')}; {_sweep(data)}")
    finally:
        catalog.close()
    return 0


def _list(catalog: Catalog) -> None:
    apps = catalog.list_apps()
    print(f"{'app':<24}{'contexts':>10}{'max contexts':>14}{'max tokens':>12}{'max pending':>13}")
    for app, n in apps:
        pending = "default" if app.max_pending is None else str(app.max_pending)
        print(f"{app.name:<24}{n:>10}{app.max_contexts:>14}{app.max_context_tokens:>12}{pending:>13}")
    if not apps:
        print("(no apps yet: llmaas apps add NAME)")


def _sweep(home: DataDir) -> str:
    """Ask a running service to drop the KV of contexts that are gone; without one, its next start does it."""
    if not home.socket.exists():
        return "their KV files go when the service next starts"
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(home.socket)), base_url="http://llmaas",
                          timeout=30) as http:
            r = http.post("/v1/admin/sweep")
            r.raise_for_status()
    except httpx.HTTPError:
        return "the service did not answer: their KV files go when it next starts"
    return f"the running service dropped their KV ({plural(len(r.json()['dropped_contexts']), 'context')})"
