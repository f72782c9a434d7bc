"""ElastiLM's decisions per request, as pure functions on integer tenths: feasibility, the self-induced label rule,
the runtime repair, the context ratio, and the baselines' fixed settings.

Owns the rules of ELASTILM.md §1, §7, §8 and §10. A model level m, a prompt ratio p and both SLOs are integer tenths
(m 2..10, p 1..10, prefill SLO 2..10, decode SLO 5..10), so the proxy test `m·p ≤ prefill` and `m ≤ decode` is exact.
Feasibility is a predicate, so the paper's m·p proxy and a measured latency table are interchangeable. Ignores how
configs are run and scored (the evaluation and the service) and where predictions come from (the tiny LM's heads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from llmaas.elastic.model_levels import MODEL_LEVELS

PROMPT_RATIOS = tuple(range(10, 0, -1))  # p in tenths, 1.0 .. 0.1: the decision head's 10 classes
PREFILL_SLOS = tuple(range(2, 11))  # 0.2 .. 1.0 of the full model's TTFT on the full prompt
DECODE_SLOS = tuple(range(5, 11))  # 0.5 .. 1.0 of the full model's TPOT
# The standalone evaluation's SLO pairs (prefill, decode), tenths, and the full model as reference.
STANDALONE_SLOS = ((8, 9), (6, 8), (4, 7), (2, 6), (2, 5), (10, 10))


@dataclass(frozen=True, order=True)
class Config:
    """What a request runs: model level m and prompt ratio p, in tenths."""

    m: int
    p: int

    def __post_init__(self) -> None:
        if self.m not in MODEL_LEVELS or self.p not in PROMPT_RATIOS:
            raise ValueError(f"no config m={self.m}/10, p={self.p}/10: m is one of {MODEL_LEVELS}, p 1..10")


@dataclass(frozen=True)
class Slo:
    """A request's SLO pair: TTFT and TPOT as tenths of the full model's on the uncompressed prompt."""

    prefill: int
    decode: int

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_SLOS or self.decode not in DECODE_SLOS:
            raise ValueError(f"no SLO ({self.prefill}/10, {self.decode}/10): prefill is 0.2..1.0 and decode "
                             "0.5..1.0 in steps of 0.1")


ALL_CONFIGS = tuple(Config(m, p) for m in MODEL_LEVELS for p in PROMPT_RATIOS)
Feasible = Callable[[Config], bool]


def proxy_feasible(slo: Slo) -> Feasible:
    """The paper's linear proxy (§1): TTFT grows as m·p, TPOT as m; exact in tenths."""
    return lambda c: c.m * c.p <= 10 * slo.prefill and c.m <= slo.decode


def label(correct: Mapping[Config, bool], feasible: Feasible) -> tuple[Config, bool]:
    """The self-induced label (§7, our rule) of one question under one SLO, from its correctness at every config:
    among feasible configs the largest correct m, then the smallest correct p at that m. With nothing correct, the
    smallest feasible config (smallest m, then smallest p), or the cheapest config if none is feasible. Returns
    (label, fell_back)."""
    ok = [c for c in ALL_CONFIGS if feasible(c) and correct.get(c, False)]
    if ok:
        best_m = max(c.m for c in ok)
        return Config(best_m, min(c.p for c in ok if c.m == best_m)), False
    return _cheapest([c for c in ALL_CONFIGS if feasible(c)] or list(ALL_CONFIGS)), True


def repair(predicted: Config, feasible: Feasible) -> tuple[Config, bool]:
    """The config a request runs (§8, our rule): the prediction if feasible; else the largest feasible m at the
    predicted p; else the feasible config with the largest m, then the largest p; else the cheapest config, which
    will miss its SLO. Returns (config, slo_miss_expected)."""
    if feasible(predicted):
        return predicted, False
    same_p = [c for c in ALL_CONFIGS if c.p == predicted.p and feasible(c)]
    if same_p:
        return max(same_p, key=lambda c: c.m), False
    anywhere = [c for c in ALL_CONFIGS if feasible(c)]
    if anywhere:
        return max(anywhere, key=lambda c: (c.m, c.p)), False
    return _cheapest(ALL_CONFIGS), True


def _cheapest(configs: Iterable[Config]) -> Config:
    return min(configs, key=lambda c: (c.m, c.p))


def context_ratio(p: int, context_tokens: int, query_tokens: int) -> float:
    """The fraction of the refinable context to keep so that context + query is p/10 of the whole (§6):
    max(0, ((L_ctx + L_q)·p − L_q) / L_ctx). The query (question and choices) is never compressed."""
    if context_tokens <= 0:
        return 1.0
    return max(0.0, ((context_tokens + query_tokens) * p / 10 - query_tokens) / context_tokens)


def kept_context_tokens(p: int, context_tokens: int, query_tokens: int) -> int:
    """n = ⌊r_ctx · L_ctx⌋ + 1 LLM tokens of context to keep (§6), at most the whole context."""
    if p == 10:
        return context_tokens
    return min(context_tokens, int(context_ratio(p, context_tokens, query_tokens) * context_tokens) + 1)


def baseline_ratio(slo: Slo) -> int:
    """r = min(prefill SLO, decode SLO), in tenths: the budget of the layer-dropping baselines (§10)."""
    return min(slo.prefill, slo.decode)


def llmpruner_config(slo: Slo) -> Config:
    """Model-only elasticity (§10.3): the largest level within the prefill SLO, with the full prompt."""
    return Config(max(m for m in MODEL_LEVELS if m <= slo.prefill), 10)


def layers_kept(slo: Slo, n_layers: int) -> int:
    """LayerReduction, ShortGPT and LaCo keep ⌊r·L⌋ layers (§10.4-6; not the artifact's one fewer)."""
    return baseline_ratio(slo) * n_layers // 10


@dataclass(frozen=True)
class SloRequest:
    """What a request asks for: TTFT and TPOT as fractions of the full model's on the uncompressed prompt (the
    paper's form, 1.0 = no constraint) or as absolute targets in milliseconds. Each of the two may be left out."""

    ttft: float | None = None
    tpot: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft", "tpot"):
            frac, ms = getattr(self, name), getattr(self, f"{name}_ms")
            if frac is not None and ms is not None:
                raise ValueError(f"give {name} as a fraction or as {name}_ms, not both")
            if frac is not None and not 0 < frac <= 1:
                raise ValueError(f"slo.{name} is a fraction of the full model's, in (0, 1]; got {frac}")
            if ms is not None and not ms > 0:
                raise ValueError(f"slo.{name}_ms must be > 0; got {ms}")

    def budgets_s(self, full_ttft_s: float, full_tpot_s: float) -> tuple[float, float]:
        """(TTFT budget, TPOT budget) in seconds, given the full model's on this prompt; inf where not set."""
        def one(frac: float | None, ms: float | None, full: float) -> float:
            return frac * full if frac is not None else ms / 1e3 if ms is not None else float("inf")
        return one(self.ttft, self.ttft_ms, full_ttft_s), one(self.tpot, self.tpot_ms, full_tpot_s)

    def tenths(self, full_ttft_s: float, full_tpot_s: float) -> Slo:
        """The SLO-token pair the tiny LM reads: each budget as a fraction of the full model's, rounded down to
        tenths (the token never promises more than was asked) and clamped to the trained grid."""
        ttft, tpot = self.budgets_s(full_ttft_s, full_tpot_s)
        return Slo(_grid(ttft / full_ttft_s, PREFILL_SLOS), _grid(tpot / full_tpot_s, DECODE_SLOS))


def _grid(fraction: float, grid: tuple[int, ...]) -> int:
    return min(max(int(fraction * 10 + 1e-9), grid[0]), grid[-1]) if fraction != float("inf") else grid[-1]
