"""KVLevel assignment (LLMS §4.4, §4.6): the O(N) solver against brute force, endpoint solutions, down-only."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from llmaas.kv.codec import KVLevel
from llmaas.memory.kv_levels import (
    assign_levels,
    budget_units,
    compression_ratios,
    split_counts,
)

# Dyadic values (k / 2^n) keep every sum and product below exact in float64, so "equal" and "tie" mean exactly that.
LEVEL_ERROR = {KVLevel.INT8: 0.0, KVLevel.INT4: 0.25, KVLevel.INT2: 1.0}
UNITS = {KVLevel.INT8: 4, KVLevel.INT4: 2, KVLevel.INT2: 1}
PAPER_WEIGHT = {KVLevel.INT8: 1.0, KVLevel.INT4: 2.0, KVLevel.INT2: 4.0}


def random_densities(rng: np.random.Generator, n: int) -> list[float]:
    if rng.random() < 0.3:  # few distinct values: many ties
        return [float(x) for x in rng.integers(0, 4, n) / 4]
    return [float(x) for x in rng.integers(0, 2**12, n) / 2**12]


def random_level_error(rng: np.random.Generator) -> dict[KVLevel, float]:
    e4, e2 = sorted(int(x) for x in rng.integers(0, 2**8, 2))
    return {KVLevel.INT8: 0.0, KVLevel.INT4: e4 / 2**8, KVLevel.INT2: e2 / 2**8}


def band_score(desc: list[float], n8: int, n4: int, objective: str, level_error: dict[KVLevel, float]) -> float:
    bands = (desc[:n8], desc[n8 : n8 + n4], desc[n8 + n4 :])
    if objective == "paper":
        return sum(w * sum(b) for w, b in zip((1.0, 2.0, 4.0), bands, strict=True))
    levels = (KVLevel.INT8, KVLevel.INT4, KVLevel.INT2)
    return -sum(level_error[lv] * sum(b) for lv, b in zip(levels, bands, strict=True))


def brute_force_split(desc: list[float], ratio: str, objective: str, level_error: dict[KVLevel, float]) -> tuple:
    n = len(desc)
    t = math.floor(4 * Fraction(ratio) * n)  # exact decimal G, independent of the solver's float arithmetic
    splits = [
        (n8, n4, n - n8 - n4) for n8 in range(n + 1) for n4 in range(n - n8 + 1) if 4 * n8 + 2 * n4 + (n - n8 - n4) == t
    ]
    return max(splits, key=lambda s: (band_score(desc, s[0], s[1], objective, level_error), s[0]))


@pytest.mark.parametrize("objective", ["paper", "density_error"])
def test_solver_equals_brute_force_over_integer_splits(objective: str) -> None:
    rng = np.random.default_rng(4)
    for case in range(1000):
        n = int(rng.integers(1, 129))
        ratio = ("0.3", "0.5", "0.7")[case % 3]
        desc = sorted(random_densities(rng, n), reverse=True)
        err = random_level_error(rng)
        assert split_counts(desc, float(ratio), objective, err) == brute_force_split(desc, ratio, objective, err), case


def test_sorted_bands_are_optimal_for_density_error() -> None:
    """Over every assignment of levels (not only rank-contiguous bands) meeting the byte constraint, tiny N."""
    rng = np.random.default_rng(5)
    for case in range(150):
        n, ratio = int(rng.integers(1, 8)), (0.3, 0.5, 0.7)[case % 3]
        dens, err = random_densities(rng, n), random_level_error(rng)
        t = budget_units(n, ratio)
        best = min(
            sum(d * err[lv] for d, lv in zip(dens, levels, strict=True))
            for levels in itertools.product(UNITS, repeat=n)
            if sum(UNITS[lv] for lv in levels) == t
        )
        got = assign_levels(dens, [KVLevel.INT8] * n, ratio, "density_error", err)
        assert sum(UNITS[lv] for lv in got) == t
        assert sum(d * err[lv] for d, lv in zip(dens, got, strict=True)) == best, case


def test_paper_objective_has_only_endpoint_solutions() -> None:
    """Eq. 3 as printed is convex in n8 (§4.4 caveat): the optimum is the smallest or the largest feasible n8."""
    rng = np.random.default_rng(6)
    for case in range(300):
        n, ratio = int(rng.integers(1, 129)), (0.3, 0.5, 0.7)[case % 3]
        t = budget_units(n, ratio)
        lo, hi = max(0, math.ceil((t - 2 * n) / 2)), (t - n) // 3
        n8, n4, n2 = split_counts(sorted(rng.random(n), reverse=True), ratio, "paper")
        assert n8 in (lo, hi)
        if ratio == 0.5:  # f8 = 0 (all INT4) or f8 = 1/3 (INT8 + INT2, INT4 only as the rounding remainder)
            assert (n8, n4, n2) == (0, n, 0) or n4 <= 2


def test_density_error_has_interior_optima() -> None:
    desc = [1.0] * 4 + [0.5] * 8 + [0.125] * 12  # N = 24, G = 0.5, T = 48: feasible n8 = 0..8
    n8, n4, n2 = split_counts(desc, 0.5, "density_error", LEVEL_ERROR)
    assert 0 < n8 < 8 and n4 > 0 and n2 > 0


def test_hand_worked_example() -> None:
    # N = 4, densities [0.4, 0.1, 0.3, 0.2], G = 0.5 -> T = floor(4 * 0.5 * 4) = 8.
    # n4 = T - N - 3*n8 = 4 - 3*n8 >= 0 and n2 = 2N - T + 2*n8 = 2*n8 >= 0  ->  n8 in {0, 1}.
    #   n8 = 0: (n8, n4, n2) = (0, 4, 0), every chunk INT4.
    #   n8 = 1: (1, 1, 2): by rank chunk 0 (0.4) INT8, chunk 2 (0.3) INT4, chunks 3 (0.2) and 1 (0.1) INT2.
    # paper, J = 1*S8 + 2*S4 + 4*S2:
    #   n8 = 0: 2 * 1.0 = 2.0;   n8 = 1: 0.4 + 2*0.3 + 4*(0.2 + 0.1) = 2.2   -> n8 = 1.
    # density_error with e(INT4) = 0.25, e(INT2) = 1.0, cost = Σ D_i * e(level_i):
    #   n8 = 0: 0.25 * 1.0 = 0.25;   n8 = 1: 0 + 0.25*0.3 + 1.0*0.3 = 0.375   -> n8 = 0.
    dens, int8 = [0.4, 0.1, 0.3, 0.2], [KVLevel.INT8] * 4
    assert budget_units(4, 0.5) == 8
    assert assign_levels(dens, int8, 0.5, "paper") == [KVLevel.INT8, KVLevel.INT2, KVLevel.INT4, KVLevel.INT2]
    assert assign_levels(dens, int8, 0.5, "density_error", LEVEL_ERROR) == [KVLevel.INT4] * 4
    # A more skewed context flips density_error: [0.7, 0.1, 0.1, 0.1] costs 0.25 at n8 = 0 but
    # 0.25*0.1 + 1.0*(0.1 + 0.1) = 0.225 at n8 = 1; the tied 0.1s rank by lower index.
    skewed = assign_levels([0.7, 0.1, 0.1, 0.1], int8, 0.5, "density_error", LEVEL_ERROR)
    assert skewed == [KVLevel.INT8, KVLevel.INT4, KVLevel.INT2, KVLevel.INT2]


@pytest.mark.parametrize("objective", ["paper", "density_error"])
def test_down_only_under_repeated_releveling(objective: str) -> None:
    rng = np.random.default_rng(7)
    levels: list[KVLevel] = []
    for _ in range(60):
        levels += [KVLevel.INT8] * int(rng.integers(0, 3))  # newly sealed chunks enter at INT8
        dens = [float(x) for x in rng.random(len(levels))]  # densities drift between calls
        new = assign_levels(dens, levels, 0.5, objective, LEVEL_ERROR)
        assert all(b <= a for a, b in zip(levels, new, strict=True))
        assert sum(UNITS[lv] for lv in new) <= budget_units(len(levels), 0.5)
        levels = new


def test_budget_units() -> None:
    assert [budget_units(10, g) for g in (0.25, 0.3, 0.5, 0.7, 1.0)] == [10, 12, 20, 28, 40]
    assert budget_units(0, 0.5) == 0
    assert budget_units(4, 0.95) == 14  # floor(15.2) = 15 = 4N - 1 is unattainable: one unit less
    assert split_counts([1.0] * 4, 0.95, "paper") == (3, 1, 0)


def test_compression_ratios() -> None:
    chunk_bytes = {KVLevel.INT8: 198_720, KVLevel.INT4: 120_960, KVLevel.INT2: 74_880}  # §4.5 table, SmolLM2 geometry
    nominal, effective = compression_ratios([KVLevel.INT8, KVLevel.INT4, KVLevel.INT2, KVLevel.INT2], chunk_bytes)
    assert nominal == (1 + 0.5 + 0.25 + 0.25) / 4
    assert effective == pytest.approx((198_720 + 120_960 + 2 * 74_880) / (4 * 198_720))
    assert compression_ratios([], chunk_bytes) == (1.0, 1.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="ratio_global"):
        assign_levels([0.1], [KVLevel.INT8], 0.2, "paper")
    with pytest.raises(ValueError, match="unknown objective"):
        assign_levels([0.1], [KVLevel.INT8], 0.5, "best")
    with pytest.raises(ValueError, match="needs level_error"):
        assign_levels([0.1], [KVLevel.INT8], 0.5, "density_error")
    with pytest.raises(ValueError, match="e\\(INT4\\) <= e\\(INT2\\)"):
        assign_levels([0.1], [KVLevel.INT8], 0.5, "density_error", {KVLevel.INT4: 1.0, KVLevel.INT2: 0.5})
    with pytest.raises(ValueError, match="current levels"):
        assign_levels([0.1, 0.2], [KVLevel.INT8], 0.5, "paper")
    with pytest.raises(ValueError, match="current level must be"):
        assign_levels([0.1], [KVLevel.FP16], 0.5, "paper")
    with pytest.raises(ValueError, match="finite"):
        assign_levels([math.nan], [KVLevel.INT8], 0.5, "paper")
    assert assign_levels([], [], 0.5, "paper") == []
