"""ElastiLM's per-request rules on integer tenths: the proxy, the self-induced label on a hand-made correctness
grid, the runtime repair, the context ratio, and the baselines' settings against a table of SLO -> setting."""

from __future__ import annotations

import pytest

from llmaas.elastic.slo import (
    ALL_CONFIGS,
    Config,
    Slo,
    context_ratio,
    kept_context_tokens,
    label,
    layers_kept,
    llmpruner_config,
    proxy_feasible,
    repair,
)


def test_the_proxy_is_exact_at_its_boundaries():
    ok = proxy_feasible(Slo(4, 7))
    assert ok(Config(4, 10)) and ok(Config(5, 8)) and ok(Config(7, 5))  # 4*10 = 40, 5*8 = 40, 7*5 = 35
    assert not ok(Config(5, 9)) and not ok(Config(8, 5))  # 45 > 40; m 8 > decode 7
    assert all(proxy_feasible(Slo(10, 10))(c) for c in ALL_CONFIGS)
    with pytest.raises(ValueError):
        Slo(1, 5)
    with pytest.raises(ValueError):
        Config(1, 10)


def test_label_takes_the_largest_correct_m_then_its_smallest_correct_p():
    feasible = proxy_feasible(Slo(6, 8))  # m <= 8 and m*p <= 60
    correct = {Config(4, 10): True, Config(6, 10): True, Config(6, 5): True, Config(6, 3): True,
               Config(8, 7): True,  # correct and feasible (56 <= 60): the largest m wins
               Config(9, 5): True}  # correct but m 9 > decode 8: never the label
    assert label(correct, feasible) == (Config(8, 7), False)
    correct[Config(8, 7)] = False
    assert label(correct, feasible) == (Config(6, 3), False)  # m 6: the smallest correct p
    assert label({Config(10, 10): True}, feasible) == (Config(2, 1), True)  # nothing feasible is correct: fallback


def test_label_falls_back_to_the_smallest_feasible_config():
    assert label({}, proxy_feasible(Slo(2, 5))) == (Config(2, 1), True)
    assert label({}, lambda c: c.m >= 5) == (Config(5, 1), True)  # smallest m, then smallest p, among feasible
    assert label({}, lambda c: False) == (Config(2, 1), True)  # none feasible at all: the cheapest


def test_repair_keeps_p_then_widens_then_counts_a_miss():
    feasible = proxy_feasible(Slo(4, 7))
    assert repair(Config(4, 10), feasible) == (Config(4, 10), False)  # feasible: unchanged
    assert repair(Config(9, 5), feasible) == (Config(7, 5), False)  # keep p, the largest feasible m (35 <= 40)
    assert repair(Config(2, 10), lambda c: c.p <= 5 and c.m <= 6) == (Config(6, 5), False)  # no m at p: largest m, p
    assert repair(Config(9, 9), lambda c: False) == (Config(2, 1), True)  # nothing feasible: cheapest, a miss


def test_context_ratio_spares_the_query():
    assert context_ratio(10, 300, 50) == pytest.approx(1.0)
    assert context_ratio(5, 300, 50) == pytest.approx((350 * 0.5 - 50) / 300)
    assert context_ratio(1, 300, 50) == 0.0  # the query alone is over 10%: the context goes entirely
    assert kept_context_tokens(5, 300, 50) == int((350 * 0.5 - 50) / 300 * 300) + 1
    assert kept_context_tokens(10, 300, 50) == 300


@pytest.mark.parametrize(("slo", "pruner", "layers"), [
    (Slo(10, 10), Config(10, 10), 30), (Slo(8, 9), Config(8, 10), 24), (Slo(6, 8), Config(6, 10), 18),
    (Slo(4, 7), Config(4, 10), 12), (Slo(2, 6), Config(2, 10), 6), (Slo(2, 5), Config(2, 10), 6),
    (Slo(9, 5), Config(9, 10), 15),  # the layer budget is min(prefill, decode)
])
def test_baseline_settings_by_slo(slo, pruner, layers):
    assert llmpruner_config(slo) == pruner
    assert layers_kept(slo, 30) == layers


def test_latency_table_interpolates_and_never_lets_a_longer_prompt_look_cheaper():
    from llmaas.elastic.latency import LatencyTable
    from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
    levels = {model_level_name(m): {"tpot_s": m / 1000, "ttft_s": {"128": 0.1, "256": 0.3, "512": 0.25}}
              for m in MODEL_LEVELS}
    table = LatencyTable({"levels": levels, "tlm_s": {"128": 0.01, "512": 0.04}})
    assert table.ttft_s(10, 192) == pytest.approx(0.2)
    assert table.ttft_s(10, 512) == pytest.approx(0.3)  # the noisy 0.25 is lifted to the 256-token time
    assert table.tlm_s(1024 + 128) == pytest.approx(2 * 0.04 + 0.01)  # two full windows and a partial one
