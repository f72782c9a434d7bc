"""Diagnose LLMS level assignment on perplexity: does the chunk density pick the chunks that tolerate INT2?

For each WikiText-2 window (segment A compressed, B scored, as in `llmaas eval kv`), scores band splits at the same
byte budget (ratio_global 0.5: n8 + n4 + n2 = N, 4·n8 + 2·n4 + n2 = 2N) for several n8, with the chunks ordered by
density (what LLMS does), at random, by recency (latest first) and by inverse density; plus the uniform levels and
both LLMS objectives. Also summarises how skewed the densities are. Writes docs/eval_kv_sweep.json.

    .venv/bin/python scripts/kv_level_sweep.py [--windows 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from llmaas.bench.eval_kv import (
    VARIANTS,
    WIKITEXT,
    ContextKV,
    EvalConfig,
    LevelPolicy,
    VariantTally,
    ppl_segments,
    ppl_window,
    variant_policy,
)
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.spec import KVSpec
from llmaas.memory.kv_levels import budget_units
from llmaas.model.loader import load_model

ORDERS = ("density", "random", "recency", "inverse")


def chunk_order(ctx: ContextKV, order: str, seed: int) -> list[int]:
    """Sealed chunk indices, the one to protect most first."""
    n = ctx.sealed_chunks
    by_density = sorted(range(n), key=lambda i: (-ctx.chunk_densities[i], i))
    if order == "density":
        return by_density
    if order == "inverse":
        return by_density[::-1]
    if order == "recency":
        return list(range(n))[::-1]
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


def banded(n8: int, order: str, ratio_global: float, seed: int) -> LevelPolicy:
    def policy(ctx: ContextKV) -> list[KVLevel]:
        n = ctx.sealed_chunks
        t = budget_units(n, ratio_global)
        k8 = min(n8, (t - n) // 3)
        n4 = t - n - 3 * k8
        levels = [KVLevel.INT2] * n
        for rank, i in enumerate(chunk_order(ctx, order, seed)):
            levels[i] = KVLevel.INT8 if rank < k8 else KVLevel.INT4 if rank < k8 + n4 else KVLevel.INT2
        return levels + [KVLevel.INT8] * (ctx.num_chunks - n)
    return policy


def density_summary(ctx: ContextKV) -> dict:
    d = ctx.chunk_densities
    n = len(d)
    ranked = sorted(d, reverse=True)
    third = max(n // 3, 1)
    rest = d[1:]
    ranks = {i: r for r, i in enumerate(sorted(range(len(rest)), key=lambda i: rest[i]))}
    mean_idx = (len(rest) - 1) / 2
    cov = sum((i - mean_idx) * (ranks[i] - mean_idx) for i in range(len(rest)))
    var = sum((i - mean_idx) ** 2 for i in range(len(rest)))
    return {
        "chunk0_over_median": d[0] / statistics.median(d),
        "top_third_over_bottom_two_thirds": (sum(ranked[:third]) / third) / (sum(ranked[third:]) / (n - third)),
        "max_over_min_excluding_chunk0": max(rest) / min(rest),
        "spearman_density_vs_position_excluding_chunk0": cov / var,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8, help="perplexity windows (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--ratio-global", type=float, default=0.5, help="byte budget G (default: 0.5)")
    p.add_argument("--json", type=Path, help="output (default: docs/eval_kv_sweep.json, or _G<ratio> for G != 0.5)")
    args = p.parse_args()
    if args.json is None:
        suffix = "" if args.ratio_global == 0.5 else f"_G{args.ratio_global:g}"
        args.json = Path(f"docs/eval_kv_sweep{suffix}.json")
    torch.set_num_threads(args.threads)
    cfg = EvalConfig(ratio_global=args.ratio_global, ppl_windows=args.windows)
    loaded = load_model()
    spec = KVSpec.from_config(loaded.config)
    geom = ChunkGeometry(spec, cfg.chunk_tokens)
    segments = ppl_segments(loaded.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8"), add_bos=False), cfg)
    n = cfg.ppl_context_tokens // cfg.chunk_tokens
    max_n8 = (budget_units(n, cfg.ratio_global) - n) // 3
    tallies: dict[str, VariantTally] = {}
    summaries, splits = [], {}
    t0 = time.perf_counter()
    for w, (ids_a, ids_b) in enumerate(segments):
        policies: dict[str, LevelPolicy] = {v: variant_policy(v, cfg.ratio_global) for v in VARIANTS}
        for n8 in sorted({0, 1, 2, 4, 8, max_n8 * 2 // 3, max_n8}):
            policies[f"density n8={n8}"] = banded(n8, "density", cfg.ratio_global, w)
        for order in ORDERS[1:]:
            for n8 in sorted({0, min(8, max_n8), max_n8}):
                policies[f"{order} n8={n8}"] = banded(n8, order, cfg.ratio_global, w)
        ctx = ppl_window(loaded.model, spec, ids_a, ids_b, geom, policies, tallies)
        summaries.append(density_summary(ctx))
        for v in ("llms_paper", "llms_error"):
            lv = ctx.levels(v, cfg.ratio_global)
            splits.setdefault(v, []).append([lv.count(x) for x in (KVLevel.INT8, KVLevel.INT4, KVLevel.INT2)])
        print(f"window {w + 1}/{len(segments)}  {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    fp16 = math.exp(tallies["fp16"].nll_sum / tallies["fp16"].nll_tokens)
    rows = {}
    for name, t in tallies.items():
        ppl = math.exp(t.nll_sum / t.nll_tokens)
        chunks = sum(t.chunk_counts.values())
        rows[name] = {"ppl": ppl, "ppl_increase_pct": 100 * (ppl / fp16 - 1), "kl_to_fp16": t.kl_sum / t.nll_tokens,
                      "top1_agreement": t.top1_sum / t.nll_tokens,
                      "level_fractions": {KVLevel(b).name: c / chunks for b, c in sorted(t.chunk_counts.items())},
                      "effective_ratio": sum(geom.payload_bytes(KVLevel(b)) * c for b, c in t.chunk_counts.items())
                      / (geom.payload_bytes(KVLevel.INT8) * chunks)}
    print(f"{'policy':<22}{'INT8':>6}{'INT4':>6}{'INT2':>6}{'eff.':>7}{'ppl':>9}{'Δppl%':>8}{'KL':>9}")
    for name, r in rows.items():
        f = r["level_fractions"]
        print(f"{name:<22}" + "".join(f"{f.get(lv, 0):>6.2f}" for lv in ("INT8", "INT4", "INT2"))
              + f"{r['effective_ratio']:>7.3f}{r['ppl']:>9.3f}{r['ppl_increase_pct']:>8.2f}{r['kl_to_fp16']:>9.4f}")
    keys = summaries[0].keys()
    density = {k: statistics.median(s[k] for s in summaries) for k in keys}
    print("density skew (median over windows):", json.dumps(density))
    print("LLMS splits (n8, n4, n2) per window:", json.dumps(splits))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": {**vars(cfg), "windows": args.windows, "threads": args.threads,
                                                "tasks": list(cfg.tasks)},
                                     "policies": rows, "density_skew_median": density,
                                     "density_skew_per_window": summaries, "llms_splits": splits,
                                     "runtime_s": time.perf_counter() - t0}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
