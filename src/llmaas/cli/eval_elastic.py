"""`llmaas eval elastic`: the options of the elastic-levels evaluation (llmaas.bench.eval_elastic runs it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmaas.bench import eval_elastic
from llmaas.bench.eval_elastic import EvalElasticConfig
from llmaas.cli.common import add_model_options, positive_int
from llmaas.elastic.model import ElasticModel
from llmaas.engine.cpu_governor import apply_threads


def build_parser() -> argparse.ArgumentParser:
    d = EvalElasticConfig()
    p = argparse.ArgumentParser(prog="llmaas eval elastic", description=eval_elastic.__doc__)
    add_model_options(p)
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--png", type=Path, help="accuracy vs TTFT plot (default: the JSON path with .png)")
    p.add_argument("--items", type=positive_int, default=d.items, help=f"items per standalone task (default {d.items})")
    p.add_argument("--agent-items", type=positive_int, default=d.agent_items,
                   help=f"items per agent task (default {d.agent_items})")
    p.add_argument("--phase", choices=("all", "accuracy", "latency"), default="all",
                   help="accuracy: scores only (safe on a busy machine); latency: timings only; all (default)")
    p.add_argument("--elastic-dir", type=Path, help="artifact directory (default: the model's cache dir)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvalElasticConfig(items=args.items, agent_items=args.agent_items)
    apply_threads(args.threads)
    elastic = ElasticModel.open(args.model, args.elastic_dir, use_kernels=not args.no_kernels)
    eval_elastic.run(elastic, cfg, args.json, args.png, args.phase)
    return 0
