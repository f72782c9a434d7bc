"""`llmaas eval <name>`: dispatch to a quality evaluation (options in llmaas.cli.eval_*, the work in llmaas.bench)."""

from __future__ import annotations

from llmaas.bench.plotting import BENCH_EXTRA_HINT
from llmaas.cli import run_subcommand

EVALUATIONS = {  # name -> (module, one-line summary)
    "kv": ("llmaas.cli.eval_kv", "perplexity and task scores of FP16/INT8/INT4/INT2 and LLMS-compressed KV"),
    "elastic": ("llmaas.cli.eval_elastic", "accuracy, perplexity and latency of the elastic levels vs "
                                             "layer-dropping baselines at matched TTFT"),
}


def main(argv: list[str]) -> int:
    return run_subcommand("llmaas eval", EVALUATIONS, argv,
                          f"Results are JSON; {BENCH_EXTRA_HINT}.")
