"""Tolerance-aware KV level assignment (LLMS §4.3-4.6): which chunks of a context stay INT8 and which drop to INT4/INT2.

Owns the exact O(N) split solver under the integer byte constraint, its two objectives (`paper`: Eq. 3 as printed;
`density_error`: ours), the down-only rule and the nominal/effective ratio of an assignment. Ignores where densities
come from, how chunks are requantized and when re-leveling runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Literal, get_args

from llmaas.kv.codec import KVLevel

# The one list of objectives (MemoryPolicy.objective uses it too). The functions below still take a plain str and
# reject unknown names at run time: their callers include benchmarks that pick an objective by name.
Objective = Literal["paper", "density_error"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
COMPRESSIBLE = (KVLevel.INT8, KVLevel.INT4, KVLevel.INT2)  # bands in order of decreasing density


def budget_units(n_chunks: int, ratio_global: float) -> int:
    """T = floor(4·G·N), the byte budget in INT2-chunk units (INT8 costs 4, INT4 2, INT2 1); 4N - 1 becomes 4N - 2."""
    _check_ratio(ratio_global)
    # The epsilon keeps a product like 4·G·N that lands a hair below an integer from losing a whole unit.
    t = math.floor(4 * ratio_global * n_chunks + 1e-9)
    # 4N - 1 is the one unattainable total (all INT8 but one unit short; the smallest step down from INT8 is 2):
    # spend one unit less rather than exceed G.
    return t - 1 if n_chunks > 0 and t == 4 * n_chunks - 1 else t


def split_counts(
    sorted_desc_densities: Sequence[float],
    ratio_global: float,
    objective: str,
    level_error: Mapping[KVLevel, float] | None = None,
) -> tuple[int, int, int]:
    """(n8, n4, n2) for rank-contiguous bands over densities sorted in decreasing order.

    n8 + n4 + n2 = N and 4·n8 + 2·n4 + n2 = T leave n8 free: n4 = T - N - 3·n8, n2 = 2N - T + 2·n8. Every feasible n8
    is scored with prefix sums; the best wins, ties to the larger n8 (more chunks kept at full precision).
    """
    w8, w4, w2 = _band_weights(objective, level_error)  # both objectives maximise w8·S8 + w4·S4 + w2·S2
    n = len(sorted_desc_densities)
    t = budget_units(n, ratio_global)
    prefix = [0.0, *accumulate(float(d) for d in sorted_desc_densities)]
    best: tuple[float, int] | None = None
    for n8 in range(max(0, -((2 * n - t) // 2)), (t - n) // 3 + 1):  # n2 >= 0 .. n4 >= 0
        end4 = t - n - 2 * n8  # n8 + n4
        score = w8 * prefix[n8] + w4 * (prefix[end4] - prefix[n8]) + w2 * (prefix[n] - prefix[end4])
        if best is None or score >= best[0]:
            best = (score, n8)
    assert best is not None, "1/4 <= G <= 1 always leaves a feasible split"
    n8 = best[1]
    return n8, t - n - 3 * n8, 2 * n - t + 2 * n8


def assign_levels(
    chunk_densities: Sequence[float],
    current_levels: Sequence[KVLevel],
    ratio_global: float,
    objective: str,
    level_error: Mapping[KVLevel, float] | None = None,
) -> list[KVLevel]:
    """Target level per chunk (same order as the input): the densest band INT8, then INT4, then INT2, never above
    a chunk's current level (a requantized chunk cannot regain precision short of recompute, §4.6).

    Ranks are by density, decreasing; equal densities rank the lower chunk index first.
    """
    if len(chunk_densities) != len(current_levels):
        raise ValueError(f"{len(chunk_densities)} densities but {len(current_levels)} current levels")
    for i, (d, level) in enumerate(zip(chunk_densities, current_levels, strict=True)):
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"chunk {i}: density must be finite and >= 0, got {d}")
        if level not in COMPRESSIBLE:
            raise ValueError(f"chunk {i}: current level must be INT8, INT4 or INT2, got {level!r}")
    order = sorted(range(len(chunk_densities)), key=lambda i: (-chunk_densities[i], i))
    n8, n4, _ = split_counts([chunk_densities[i] for i in order], ratio_global, objective, level_error)
    targets = [KVLevel.INT2] * len(order)
    for rank, i in enumerate(order):
        target = KVLevel.INT8 if rank < n8 else KVLevel.INT4 if rank < n8 + n4 else KVLevel.INT2
        targets[i] = min(target, KVLevel(current_levels[i]))  # down-only
    return targets


def compression_ratios(levels: Sequence[KVLevel], chunk_bytes: Mapping[KVLevel, int]) -> tuple[float, float]:
    """(nominal, effective) ratio of an assignment relative to all-INT8; 1.0 for no chunks.

    Nominal counts bits (INT4 = 1/2); effective counts the true bytes per chunk, scales and zero-points included (§4.5).
    """
    if not levels:
        return 1.0, 1.0
    nominal = sum(int(level) for level in levels) / (8 * len(levels))
    effective = sum(chunk_bytes[level] for level in levels) / (chunk_bytes[KVLevel.INT8] * len(levels))
    return nominal, effective


def _band_weights(objective: str, level_error: Mapping[KVLevel, float] | None) -> tuple[float, float, float]:
    if objective == "paper":
        return 1.0, 2.0, 4.0  # 1/ratio_w for ratio 1, 1/2, 1/4
    if objective == "density_error":
        if level_error is None:
            raise ValueError("objective 'density_error' needs level_error (e.g. llmaas.kv.codec.LEVEL_ERROR)")
        e8 = float(level_error.get(KVLevel.INT8, 0.0))
        e4, e2 = float(level_error[KVLevel.INT4]), float(level_error[KVLevel.INT2])
        # Sorted bands are optimal only when less precision never means less error (rearrangement inequality).
        if not (e8 == 0.0 and 0.0 <= e4 <= e2 and math.isfinite(e2)):
            raise ValueError(f"level_error needs e(INT8) = 0 <= e(INT4) <= e(INT2), finite; got {dict(level_error)}")
        return -e8, -e4, -e2  # minimising Σ D·e == maximising Σ D·(-e)
    raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")


def _check_ratio(ratio_global: float) -> None:
    if not 0.25 <= ratio_global <= 1.0:
        raise ValueError(f"ratio_global must be in [1/4, 1] (INT2..INT8 on average), got {ratio_global}")
