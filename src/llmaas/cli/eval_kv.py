"""`llmaas eval kv`: the options of the KV-compression evaluation (llmaas.bench.eval_kv runs it) and of its two
diagnostics, `--sweep` (llmaas.bench.kv_level_sweep) and `--level-error` (llmaas.bench.kv_level_error)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmaas.bench import eval_kv, kv_level_error, kv_level_sweep
from llmaas.bench.eval_kv import TASKS, EvalConfig
from llmaas.cli.common import add_model_options, load_from_args, positive_int
from llmaas.kv import codec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas eval kv", description=eval_kv.__doc__,
                                epilog="JSON: {variants: {<variant>: {ppl, bytes_per_token, accuracy: {<task>: x}}}, "
                                       "config, machine, ci95, bytes, fidelity, agree_fp16, ppl_windows, examples}. "
                                       "--threads defaults to 1 here: this measures quality, not speed, and on "
                                       "2 shared cores one thread ran 7x faster than two. The default run takes "
                                       "about 21 minutes on 2 shared cores; --quick about 2. "
                                       "--sweep's JSON: {config, policies: {<policy>: {ppl, ppl_increase_pct, "
                                       "kl_to_fp16, top1_agreement, level_fractions, effective_ratio}}, "
                                       "density_skew_median, density_skew_per_window, llms_splits, runtime_s}; "
                                       "--level-error's: {level_error: {data, levels: {<level>: {k_vs_int8, "
                                       "v_vs_int8, e, k_vs_fp16, v_vs_fp16}}, command, model, machine, threads, "
                                       "runtime_s}}.")
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
                   help="a tiny run: 2 windows of 256+64 tokens and 2 items per task (overrides the sizes above); "
                        "with --level-error, 1 sequence of 256 tokens")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true",
                      help="instead of the variants and tasks: score byte-equal INT8/INT4/INT2 band splits at "
                           "--ratio-global on the perplexity windows, chunks ranked by density, at random, by recency "
                           "and by inverse density (docs/EVAL_KV.md's diagnosis; --windows 8: about 6 min)")
    mode.add_argument("--level-error", action="store_true",
                      help="instead: measure the level errors e(w) of codec.LEVEL_ERROR on "
                           f"{kv_level_error.LevelErrorConfig.num_seqs} x {kv_level_error.LevelErrorConfig.seq_tokens}"
                           " alpaca tokens (about 20 s); --json sets that file's level_error entry, keeping the rest")
    add_model_options(p)
    # One thread by default: this measures quality, not speed, and on a shared 2-core machine PyTorch's two
    # spinning OpenMP threads ran the harness 7x slower than one thread (measured: 56 s vs 8 s for --quick's windows).
    p.set_defaults(threads=1)
    return p


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.sweep or args.level_error) and (args.png or args.task):
        parser.error("--png and --task go with the variants' evaluation, not with --sweep or --level-error")
    if args.level_error:
        cfg_e = kv_level_error.QUICK if args.quick else kv_level_error.LevelErrorConfig()
        kv_level_error.run(load_from_args(args), cfg_e, args.json, " ".join(["llmaas eval kv", *argv]))
        return 0
    cfg = EvalConfig(args.ratio_global, codec.DEFAULT_CHUNK_TOKENS, args.windows, args.context_tokens,
                     args.target_tokens, args.limit, tuple(args.task or TASKS))
    if args.quick:
        cfg = EvalConfig(cfg.ratio_global, cfg.chunk_tokens, 2, 256, 64, 2, cfg.tasks)
    if args.sweep:
        kv_level_sweep.run(load_from_args(args), cfg, args.json)
    else:
        eval_kv.run(load_from_args(args), cfg, args.json, args.png)
    return 0
