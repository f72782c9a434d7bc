"""The `llmaas` command: a thin dispatcher to one module per subcommand (each with its own parser and main).

Owns the command table, `--version`, the top-level help and the mapping of typed errors to exit code 2. `llmaas bench`
and `llmaas eval` dispatch the same way (`run_subcommand`). Also the one wording helper subcommands share (`plural`).
Ignores every subcommand's options.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from llmaas.errors import LlmaasError

COMMANDS = {  # name -> (module with main(argv) -> exit code, one-line summary for the help)
    "demo": ("llmaas.cli.demo", "start the service and show two apps holding separate persistent contexts"),
    "serve": ("llmaas.cli.serve", "run the service: one resident model, apps' persistent contexts, HTTP on a Unix "
                                  "socket (+ TCP)"),
    "apps": ("llmaas.cli.apps", "register apps and manage their keys and quotas (`llmaas apps --help`)"),
    "chat": ("llmaas.cli.chat", "talk to the running service from a terminal, on a context you can resume"),
    "generate": ("llmaas.cli.generate", "generate text from a prompt on the resident model (streamed, no service "
                                        "needed)"),
    "openapi": ("llmaas.cli.openapi", "print the service's OpenAPI document (the repo keeps it in docs/openapi.json)"),
    "info": ("llmaas.cli.info", "show the model's id, architecture, parameters, weight formats and KV bytes per token"),
    "bench": ("llmaas.cli.bench", "benchmarks: `llmaas bench engine|service|restore|trace|switch` (`llmaas bench` "
                                  "says what each measures)"),
    "eval": ("llmaas.cli.eval", "quality evaluations: `llmaas eval kv|elastic` (KV compression variants; elastic "
                                "sub-models vs baselines)"),
    "elastic": ("llmaas.cli.elastic", "ElastiLM's offline steps: `llmaas elastic build|train|profile` (levels, LoRA, "
                                      "latency table)"),
    "check": ("llmaas.cli.check", "reliability campaigns on live services: `llmaas check reliability [--quick]` "
                                  "(crash, fuzz, isolation, soak)"),
    "profile": ("llmaas.cli.profile", "measure (once) the restore cost model the KV planner uses; --refresh measures "
                                      "again"),
}


def usage(prog: str, commands: dict[str, tuple[str, str]], epilog: str = "") -> str:
    width = max(map(len, commands)) + 2
    lines = [f"usage: {prog} {{{','.join(commands)}}} [options]", "",
             f"commands (`{prog} <command> --help` gives each one's options):"]
    lines += [f"  {name:<{width}} {summary}" for name, (_, summary) in commands.items()]
    return "\n".join(lines + ([f"\n{epilog}"] if epilog else []))


def run_subcommand(prog: str, commands: dict[str, tuple[str, str]], argv: list[str], epilog: str = "") -> int:
    """Run `prog NAME ARGS...` as `main(ARGS)` of NAME's module; no NAME or --help prints the table (exit 0)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, commands, epilog))
        return 0
    if argv[0] not in commands:
        print(f"{prog}: unknown command {argv[0]!r}\n\n{usage(prog, commands, epilog)}", file=sys.stderr)
        return 2
    return importlib.import_module(commands[argv[0]][0]).main(argv[1:])


def plural(count: int, noun: str) -> str:
    """'1 call', '2 calls', '0 calls' (for nouns that take a plain -s: call, token, context)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        print(f"llmaas {importlib.metadata.version('llmaas')}")
        return 0
    try:
        return run_subcommand("llmaas", COMMANDS, args, "llmaas --version prints the installed version.")
    except LlmaasError as exc:
        print(f"llmaas {args[0]}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`llmaas --help | head`): no traceback, and none at exit's flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
