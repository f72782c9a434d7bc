"""`llmaas eval kv`: the options of the KV-compression evaluation (llmaas.bench.eval_kv runs it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmaas.bench import eval_kv
from llmaas.bench.eval_kv import TASKS, EvalConfig
from llmaas.cli.common import add_model_options, load_from_args, positive_int
from llmaas.kv import codec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas eval kv", description=eval_kv.__doc__,
                                epilog="JSON: {variants: {<variant>: {ppl, bytes_per_token, accuracy: {<task>: x}}}, "
                                       "config, machine, ci95, bytes, fidelity, agree_fp16, ppl_windows, examples}. "
                                       "--threads defaults to 1 here: this measures quality, not speed, and on "
                                       "2 shared cores one thread ran 7x faster than two. The default run takes "
                                       "about 21 minutes on 2 shared cores; --quick about 2.")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    p.add_argument("--png", type=Path, metavar="FILE",
                   help="plot ppl and mean task score vs bytes per token (default: beside --json)")
    p.add_argument("--limit", type=positive_int, default=EvalConfig.limit,
                   help=f"items per task (default: {EvalConfig.limit})")
    p.add_argument("--windows", type=int, default=EvalConfig.ppl_windows,
                   help=f"perplexity windows (default: {EvalConfig.ppl_windows})")
    p.add_argument("--context-tokens", type=positive_int, default=EvalConfig.ppl_context_tokens,
                   help=f"segment A, compressed (default: {EvalConfig.ppl_context_tokens})")
    p.add_argument("--target-tokens", type=positive_int, default=EvalConfig.ppl_target_tokens,
                   help=f"segment B, scored (default: {EvalConfig.ppl_target_tokens})")
    p.add_argument("--ratio-global", type=float, default=EvalConfig.ratio_global,
                   help=f"LLMS ratio_global (default: {EvalConfig.ratio_global})")
    p.add_argument("--task", action="append", choices=sorted(TASKS), help="only this task (repeatable; default: all)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run: 2 windows of 256+64 tokens and 2 items per task (overrides the sizes above)")
    add_model_options(p)
    # One thread by default: this measures quality, not speed, and on a shared 2-core machine PyTorch's two
    # spinning OpenMP threads ran the harness 7x slower than one thread (measured: 56 s vs 8 s for --quick's windows).
    p.set_defaults(threads=1)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = EvalConfig(args.ratio_global, codec.DEFAULT_CHUNK_TOKENS, args.windows, args.context_tokens,
                     args.target_tokens, args.limit, tuple(args.task or TASKS))
    if args.quick:
        cfg = EvalConfig(cfg.ratio_global, cfg.chunk_tokens, 2, 256, 64, 2, cfg.tasks)
    eval_kv.run(load_from_args(args), cfg, args.json, args.png)
    return 0
