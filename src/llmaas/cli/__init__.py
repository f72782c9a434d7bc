"""The `llmaas` command: a thin dispatcher to one module per subcommand (each with its own parser and main)."""

from __future__ import annotations

import importlib
import sys

from llmaas.errors import LlmaasError

SUBCOMMANDS = {
    "demo": "start the service and show two apps holding separate persistent contexts",
    "serve": "run the service: one resident model, apps' persistent contexts, HTTP on a Unix socket (+ TCP)",
    "apps": "register apps and issue their keys: llmaas apps add|list|remove",
    "chat": "talk to the running service from a terminal, on a context you can resume",
    "generate": "generate text from a prompt on the resident model (streamed, no service needed)",
    "openapi": "print the service's OpenAPI document (the repo keeps it in docs/openapi.json)",
    "info": "show the model's architecture, parameters, weight formats and KV bytes per token",
    "bench": "benchmarks: `llmaas bench engine|service|restore` (speed vs peers, service overhead, cold restore)",
    "eval": "quality evaluations: `llmaas eval kv|elastic` (KV compression variants; elastic sub-models vs baselines)",
    "elastic": "ElastiLM's offline steps: `llmaas elastic build|train|profile` (levels, LoRA, latency table)",
    "profile": "measure (once) the restore cost model the KV planner uses; --refresh measures again",
}


def usage() -> str:
    lines = ["usage: llmaas <command> [options]   (llmaas <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] not in SUBCOMMANDS:
        print(f"llmaas: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llmaas.cli.{args[0]}")
    try:
        return module.main(args[1:])
    except LlmaasError as exc:
        print(f"llmaas {args[0]}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
