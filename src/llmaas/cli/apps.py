"""`llmaas apps add|list|remove`: register the apps that may use the service and issue their keys."""

from __future__ import annotations

import argparse

from llmaas.storage.catalog import DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_MAX_CONTEXTS, Catalog
from llmaas.storage.paths import DataDir


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas apps", description=__doc__)
    p.add_argument("--home", help="data directory (default: $LLMAAS_HOME or ~/.local/share/llmaas)")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="register an app and print its key (shown once)")
    add.add_argument("name")
    add.add_argument("--max-contexts", type=int, default=DEFAULT_MAX_CONTEXTS,
                     help=f"contexts the app may hold (default: {DEFAULT_MAX_CONTEXTS})")
    add.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS,
                     help=f"tokens per context, prompt and replies (default: {DEFAULT_MAX_CONTEXT_TOKENS})")
    sub.add_parser("list", help="list apps with their quotas and number of contexts")
    remove = sub.add_parser("remove", help="remove an app and all its contexts")
    remove.add_argument("name")
    args = p.parse_args(argv)
    catalog = Catalog(DataDir.resolve(args.home).create().catalog)
    try:
        if args.action == "add":
            app, key = catalog.add_app(args.name, args.max_contexts, args.max_context_tokens)
            print(f"app {app.name!r} added; its key (shown only now; the service stores a hash):\n{key}")
        elif args.action == "list":
            apps = catalog.list_apps()
            print(f"{'app':<24}{'contexts':>10}{'max contexts':>14}{'max tokens':>12}")
            for app, n in apps:
                print(f"{app.name:<24}{n:>10}{app.max_contexts:>14}{app.max_context_tokens:>12}")
            if not apps:
                print("(no apps yet: llmaas apps add NAME)")
        else:
            removed = catalog.remove_app(args.name)
            print(f"app {args.name!r} removed with {len(removed)} context(s)")
    finally:
        catalog.close()
    return 0
