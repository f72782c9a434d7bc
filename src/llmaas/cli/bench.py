"""`llmaas bench <name>`: dispatch to a benchmark (each lives in llmaas.bench and has its own options)."""

from __future__ import annotations

import importlib

BENCHMARKS = {"engine": "llmaas.bench.engine", "service": "llmaas.bench.service", "restore": "llmaas.bench.restore",
              "trace": "llmaas.bench.trace", "switch": "llmaas.bench.switch"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: llmaas bench {{{','.join(BENCHMARKS)}}} [options]   (llmaas bench <name> --help)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
