"""`llmaas eval kv --sweep`: does the chunk density pick the chunks that tolerate INT2?

On eval kv's perplexity windows (segment A compressed, B scored), scores byte-equal band splits at ratio_global G
(n8 + n4 + n2 = N, 4·n8 + 2·n4 + n2 = T) for several n8, with the sealed chunks ranked by density (what LLMS does),
at random, by recency (latest first) and by inverse density, next to eval kv's variants; and summarises how skewed
the densities are. Reuses eval kv's windows and per-window harness; ignores the task items.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llmaas.bench.eval_kv import (
    VARIANTS,
    WIKITEXT,
    EvalConfig,
    LevelPolicy,
    Progress,
    SegmentKV,
    VariantTally,
    assemble,
    ppl_segments,
    ppl_window,
    variant_policy,
)
from llmaas.bench.results import write_json
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.spec import KVSpec
from llmaas.memory.kv_levels import budget_units
from llmaas.model.loader import LoadedModel

ORDERS = ("density", "random", "recency", "inverse")
DENSITY_N8 = (0, 1, 2, 4, 8)  # INT8 chunk counts tried with the density ranking (plus 2/3 of the most and the most)
MIN_CHUNKS = 3  # the density summary compares chunk 0 with at least two others


def chunk_order(ctx: SegmentKV, order: str, seed: int) -> list[int]:
    """Sealed chunk indices ranked by `order` (one of ORDERS; `random` shuffles with `seed`), most protected first."""
    n = ctx.sealed_chunks
    by_density = sorted(range(n), key=lambda i: (-ctx.chunk_densities[i], i))
    if order == "density":
        return by_density
    if order == "inverse":
        return by_density[::-1]
    if order == "recency":
        return list(range(n))[::-1]
    if order != "random":
        raise ValueError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


def max_int8_chunks(n_chunks: int, ratio_global: float) -> int:
    """The most INT8 chunks a byte-equal split of n_chunks can hold at ratio_global ((T - N) // 3, with n4 = 0)."""
    return (budget_units(n_chunks, ratio_global) - n_chunks) // 3


def banded(n8: int, order: str, ratio_global: float, seed: int) -> LevelPolicy:
    """A policy that spends ratio_global's bytes in rank-contiguous bands along `order`: the first n8 sealed chunks
    INT8 (fewer where the budget cannot hold n8), the next n4 = T - N - 3·n8 INT4, the rest INT2; the tail INT8."""
    def policy(ctx: SegmentKV) -> list[KVLevel]:
        n = ctx.sealed_chunks
        t = budget_units(n, ratio_global)
        k8 = min(n8, (t - n) // 3)
        n4 = t - n - 3 * k8
        levels = [KVLevel.INT2] * n
        for rank, i in enumerate(chunk_order(ctx, order, seed)):
            levels[i] = KVLevel.INT8 if rank < k8 else KVLevel.INT4 if rank < k8 + n4 else KVLevel.INT2
        return levels + [KVLevel.INT8] * (ctx.num_chunks - n)
    return policy


def sweep_policies(n_chunks: int, ratio_global: float, seed: int) -> dict[str, LevelPolicy]:
    """Eval kv's variants (fp16 first: the reference), the density bands at several n8, and the other orders at
    n8 = 0, min(8, most) and the most; named like `density n8=4`."""
    most = max_int8_chunks(n_chunks, ratio_global)
    policies = {v: variant_policy(v, ratio_global) for v in VARIANTS}
    for n8 in sorted({n8 for n8 in DENSITY_N8 if n8 <= most} | {most * 2 // 3, most}):
        policies[f"density n8={n8}"] = banded(n8, "density", ratio_global, seed)
    for order in ORDERS[1:]:
        for n8 in sorted({0, min(8, most), most}):
            policies[f"{order} n8={n8}"] = banded(n8, order, ratio_global, seed)
    return policies


def density_summary(ctx: SegmentKV) -> dict[str, float]:
    """How skewed a window's sealed-chunk densities are: chunk 0 (the attention sink) over the median, the top
    third's mean over the rest's, max over min without chunk 0, and the rank correlation of density with position."""
    d = ctx.chunk_densities
    n = len(d)
    if n < MIN_CHUNKS:
        raise ValueError(f"the density summary needs at least {MIN_CHUNKS} sealed chunks; got {n}")
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


def sweep(loaded: LoadedModel, cfg: EvalConfig, ppl_text: str) -> dict:
    """Score every sweep policy on cfg's perplexity windows of ppl_text and return the result document:
    {config, policies: {<policy>: {ppl, ppl_increase_pct, kl_to_fp16, top1_agreement, level_fractions,
    effective_ratio}}, density_skew_median, density_skew_per_window, llms_splits: {<variant>: [[n8, n4, n2] per
    window]}, runtime_s}."""
    n_chunks = cfg.ppl_context_tokens // cfg.chunk_tokens
    if n_chunks < MIN_CHUNKS or cfg.ppl_windows == 0:
        raise ValueError(f"the sweep needs at least one window and segment A of at least {MIN_CHUNKS} chunks "
                         f"({MIN_CHUNKS * cfg.chunk_tokens} tokens)")
    t0 = time.perf_counter()
    spec = KVSpec.from_config(loaded.config)
    geom = ChunkGeometry(spec, cfg.chunk_tokens)
    segments = ppl_segments(loaded.tokenizer.encode(ppl_text, add_bos=False), cfg)
    tallies: dict[str, VariantTally] = {}
    summaries: list[dict[str, float]] = []
    splits: dict[str, list[list[int]]] = {}
    progress = Progress(len(segments))
    for w, (ids_a, ids_b) in enumerate(segments):
        ctx = ppl_window(loaded.model, spec, ids_a, ids_b, geom, sweep_policies(n_chunks, cfg.ratio_global, w),
                         tallies)
        summaries.append(density_summary(ctx))
        for v in ("llms_paper", "llms_error"):
            lv = ctx.levels(v, cfg.ratio_global)
            splits.setdefault(v, []).append([lv.count(x) for x in (KVLevel.INT8, KVLevel.INT4, KVLevel.INT2)])
        progress.step(1, f"sweep window {w + 1}/{len(segments)}")
    scored = assemble(cfg, geom, tallies, [], {}, 0.0)
    rows = {}
    for name in tallies:
        fidelity, size = scored["fidelity"][name], scored["bytes"][name]
        rows[name] = {"ppl": scored["variants"][name]["ppl"], "ppl_increase_pct": fidelity["ppl_increase_pct"],
                      "kl_to_fp16": fidelity["kl_to_fp16"], "top1_agreement": fidelity["top1_agreement"],
                      "level_fractions": size["level_fractions"], "effective_ratio": size["effective_ratio"]}
    return {"config": {**asdict(cfg), "tasks": list(cfg.tasks), "windows": cfg.ppl_windows},
            "policies": rows,
            "density_skew_median": {k: statistics.median(s[k] for s in summaries) for k in summaries[0]},
            "density_skew_per_window": summaries, "llms_splits": splits, "runtime_s": time.perf_counter() - t0}


def table(result: dict) -> str:
    """The sweep as text: one row per policy (level fractions, effective ratio, ppl, its increase, KL)."""
    lines = [f"{'policy':<22}{'INT8':>6}{'INT4':>6}{'INT2':>6}{'eff.':>7}{'ppl':>9}{'Δppl%':>8}{'KL':>9}"]
    for name, r in result["policies"].items():
        f = r["level_fractions"]
        lines.append(f"{name:<22}" + "".join(f"{f.get(lv, 0):>6.2f}" for lv in ("INT8", "INT4", "INT2"))
                     + f"{r['effective_ratio']:>7.3f}{r['ppl']:>9.3f}{r['ppl_increase_pct']:>8.2f}"
                     f"{r['kl_to_fp16']:>9.4f}")
    lines.append("density skew (median over windows): " + json.dumps(result["density_skew_median"]))
    lines.append("LLMS splits (n8, n4, n2) per window: " + json.dumps(result["llms_splits"]))
    return "\n".join(lines)


def run(loaded: LoadedModel, cfg: EvalConfig, json_path: Path | None = None) -> dict:
    """Sweep cfg's perplexity windows of WikiText-2, print the table, and write the JSON if asked."""
    print(f"sweeping band splits at ratio_global {cfg.ratio_global}: {cfg.ppl_windows} windows of "
          f"{cfg.ppl_context_tokens}+{cfg.ppl_target_tokens} tokens", file=sys.stderr, flush=True)
    result = sweep(loaded, cfg, WIKITEXT.read_text(encoding="utf-8"))
    result["config"] |= {"threads": torch.get_num_threads(), "model": loaded.config.name}
    print(table(result))
    print(f"runtime {result['runtime_s']:.0f} s")
    if json_path:
        write_json(result, json_path)
    return result
