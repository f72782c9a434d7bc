"""`llmaas bench <name>`: dispatch to a benchmark (each lives in llmaas.bench and has its own options)."""

from __future__ import annotations

from llmaas.bench.plotting import BENCH_EXTRA_HINT
from llmaas.cli import run_subcommand

BENCHMARKS = {  # name -> (module, one-line summary)
    "engine": ("llmaas.bench.engine", "prefill and decode speed, load time and peak RSS, ours vs llama.cpp and HF "
                                      "transformers (--peer)"),
    "cold-start": ("llmaas.bench.cold_start", "seconds from launching `llmaas serve` to its first token, step by step"),
    "service": ("llmaas.bench.service", "what the service path costs over a direct engine call (TTFT, tokens/s)"),
    "restore": ("llmaas.bench.restore", "cold switch latency of one long context restored from disk (--peer "
                                        "llama-cpp: its own state restore)"),
    "trace": ("llmaas.bench.trace", "`llmaas bench trace make`: draw one multi-app context-switching trace as JSONL"),
    "elastic": ("llmaas.bench.elastic_serving", "ElastiLM as served vs model-only elasticity and layer-dropping "
                                                "baselines, per SLO pair and on traces (--quick: about 15 min)"),
    "switch": ("llmaas.bench.switch", "the context-switching benchmark: every memory system replays the same traces "
                                      "(--quick: about 7 min)"),
}


def main(argv: list[str]) -> int:
    return run_subcommand("llmaas bench", BENCHMARKS, argv,
                          f"Results are JSON; {BENCH_EXTRA_HINT}.")
