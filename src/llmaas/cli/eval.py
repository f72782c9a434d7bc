"""`llmaas eval <name>`: dispatch to a quality evaluation (each lives in llmaas.bench and has its own options)."""

from __future__ import annotations

import importlib

EVALUATIONS = {"kv": "llmaas.bench.eval_kv", "elastic": "llmaas.bench.eval_elastic"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EVALUATIONS:
        print(f"usage: llmaas eval {{{','.join(EVALUATIONS)}}} [options]   (llmaas eval <name> --help)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return importlib.import_module(EVALUATIONS[argv[0]]).main(argv[1:])
