"""The context-switching benchmark's replay and bookkeeping: a lossless system under a tight budget answers exactly as
with unlimited memory, the budget holds, over-long contexts restart, and the 10/25 ms limits are interpolated."""

from __future__ import annotations

import pytest

from llmaas.bench.replay import SystemSetting, replay
from llmaas.bench.switch import Run, _crossing, budget_bytes, max_active_contexts, shape
from llmaas.bench.switch_report import write_results_md
from llmaas.bench.trace import TraceConfig, make_trace
from llmaas.engine.conversation import Conversation
from llmaas.memory.policy import POLICIES


@pytest.fixture(scope="module")
def small_trace(smollm):
    # 4 contexts (ag_news, xsum, samsum, cnn_dailymail), random pattern, 8 calls (3 return to a context); at max
    # length 1024 the XSum calls (1-2k tokens) cannot be sent, and CNN/DM calls (0.5-1k) restart their context
    return make_trace(TraceConfig("random", 4, seed=10, max_calls=8), Conversation(smollm.tokenizer,
                                                                                   smollm.chat_template))


def test_lossless_replay_under_a_tight_budget_equals_unlimited_memory(smollm, small_trace, tmp_path):
    policy = POLICIES["vllm-s"]
    tight = replay(smollm, small_trace, SystemSetting(policy, budget_bytes(smollm, 16, 1024, 2.0), 1024), tmp_path)
    roomy = replay(smollm, small_trace, SystemSetting(policy, 10**10, 1024), tmp_path)
    assert [r["answer"] for r in tight["records"]] == [r["answer"] for r in roomy["records"]]
    assert tight["bytes_read"] > 0 and roomy["bytes_read"] == 0  # the tight one really swapped
    assert tight["pressure"]["informative"] and not roomy["pressure"]["informative"]  # and says so; roomy cannot
    for run in (tight, roomy):
        assert run["max_resident_bytes"] <= run["budget_bytes"] and run["faults"] == 0
    assert tight["skipped_calls"] == sum(c.task == "xsum" for c in small_trace.calls)
    assert tight["calls"] + tight["skipped_calls"] == len(small_trace.calls)
    assert tight["switch_s"]["n"] == sum(r["is_switch"] for r in tight["records"]) > 0


def test_llms_replay_keeps_its_budget_and_reports_compressed_bytes(smollm, small_trace, tmp_path):
    run = replay(smollm, small_trace, SystemSetting(POLICIES["llms"], budget_bytes(smollm, 16, 1024, 1.0), 1024),
                 tmp_path)
    assert run["max_resident_bytes"] <= run["budget_bytes"] and run["faults"] == 0
    assert run["written_bytes_per_token"] < 12420  # below INT8's bytes per token: low-density chunks went to INT4/2
    assert set(run["accuracy"]) <= {"ag_news", "samsum", "cnn_dailymail"}


def test_interpolated_limits_and_the_results_page(tmp_path):
    assert _crossing([(2, 0.004), (4, 0.008), (8, 0.016)], 0.010)[0] == pytest.approx(5.0)
    assert _crossing([(2, 0.004), (4, 0.008)], 0.010) == (4.0, True)  # within the limit everywhere measured
    assert _crossing([(2, 0.020)], 0.010) == (None, False)
    metric = {"switch_s": {"mean": 0.006, "p50": 0.005, "p99": 0.02, "n": 3}}
    sweep = {"markov/2": {"llms": metric}, "markov/4": {"llms": {"switch_s": {"mean": 0.012}}}}
    assert max_active_contexts(sweep, {})["markov"]["llms"]["10ms"] == pytest.approx(3 + 1 / 3)
    base = {**metric, "cold_switch_s": metric["switch_s"], "ttft_s": metric["switch_s"], "accuracy": {"sst2": 1.0},
            "max_resident_bytes": 10, "budget_bytes": 20, "bytes_read": 0, "bytes_written": 0, "recomputed_tokens": 0,
            "records": [{"answer": "positive"}]}
    raw = {"runs": [{"run": vars(Run("main", "llms")), "result": base},
                    {"run": vars(Run("main", "vllm-s")), "result": base},
                    {"run": vars(Run("contexts", "llms", contexts=4)), "result": {"error": "budget too small"}}]}
    result = shape(raw)
    assert result["systems"]["llms"]["agree_fp16"] == 1.0
    result["config"] = {"mode": "quick", "plan": {"calls": 1}, "seed": 42, "main": vars(Run("main", "llms")),
                        "budget_1x_bytes": 1e6, "reference": "vllm-s", "machine": {}, "commit": None, "wall_s": 1.0}
    write_results_md(result, tmp_path / "RESULTS.md", tmp_path / "r.json", [])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| llms |" in text and "budget too small" in text and "max_resident_bytes <= budget_bytes" in text


def test_pressure_is_reported_and_a_run_without_it_is_flagged():
    from llmaas.bench.replay import CallRecord, pressure
    from llmaas.bench.switch_report import main_rows

    def record(is_switch: bool, hot: bool, read: int = 0, recomputed: int = 0, evictions: int = 0) -> CallRecord:
        return CallRecord("a", "sst2", is_switch, hot, 0.001, 0.1, 0.2, read, recomputed, "x", 1.0, evictions)

    calm = [record(False, False), record(True, True), record(True, False)]  # switches, but everything resident
    assert pressure(calm) == {"switches": 2, "restored_switches": 0, "restored_fraction": 0.0, "evictions": 0,
                              "bytes_read": 0, "recomputed_tokens": 0, "informative": False}
    busy = [*calm, record(True, False, read=4096, evictions=3), record(True, False, recomputed=16)]
    p = pressure(busy)
    assert (p["restored_switches"], p["restored_fraction"], p["evictions"], p["informative"]) == (2, 0.5, 3, True)
    metric = {"mean": 0.001, "p50": 0.001, "p99": 0.001, "n": 2}
    base = {"switch_s": metric, "cold_switch_s": metric, "ttft_s": metric, "accuracy": {}, "max_resident_bytes": 1,
            "budget_bytes": 2, "bytes_read": 0, "bytes_written": 0, "recomputed_tokens": 0}
    rows = main_rows({"systems": {"calm": {**base, "pressure": pressure(calm)},
                                  "busy": {**base, "pressure": p}, "old": base}})
    assert [row[-1] for row in rows] == ["none: uninformative", "2/4 restored, 3 evicted", "—"]


def test_warm_up_calls_every_context_round_robin_and_runs_unmeasured(smollm, tmp_path):
    conversation = Conversation(smollm.tokenizer, smollm.chat_template)
    warm = make_trace(TraceConfig("markov", 4, seed=10, max_calls=5, warmup_calls=8), conversation)
    assert len(warm.calls) == 13 and [c.warmup for c in warm.calls] == [True] * 8 + [False] * 5
    rounds = [sorted(c.context for c in warm.calls[k:k + 4]) for k in (0, 4)]
    assert rounds[0] == rounds[1] == sorted({c.context for c in warm.calls})  # each context once per round
    assert [c.context for c in warm.calls[:4]] != [c.context for c in warm.calls[4:8]]  # in a seeded order
    assert warm == make_trace(TraceConfig("markov", 4, seed=10, max_calls=5, warmup_calls=8), conversation)
    warm.save(tmp_path / "t.jsonl")
    assert warm.load(tmp_path / "t.jsonl") == warm
    run = replay(smollm, warm, SystemSetting(POLICIES["vllm-s"], 10**10, 1024), tmp_path)
    measured = [c for c in warm.calls[8:] if c.task != "xsum"]  # XSum cannot be sent at 1024
    assert run["calls"] == len(measured) and [r["context"] for r in run["records"]] == [c.context for c in measured]


def test_seed_spread_gives_ratios_only_where_the_compared_system_was_under_pressure():
    from llmaas.bench.switch import seed_spread

    def system(mean_s: float, informative: bool) -> dict:
        return {"switch_s": {"mean": mean_s}, "pressure": {"informative": informative, "restored_fraction": 0.5}}

    loaded = {"llms": system(0.002, True), "lmk": system(0.2, True), "swapping": system(0.03, False)}
    calm = {"llms": system(0.002, False), "lmk": system(0.002, False), "vllm-s": system(0.03, True)}
    spread = seed_spread({42: {"systems": loaded, "sweeps": {}}, 7: {"systems": calm, "sweeps": {}}})
    lmk = spread["points"]["lmk @ main"]["by_seed"]
    assert lmk["42"]["ratio"] == pytest.approx(100.0) and lmk["42"]["both_under_pressure"]
    assert lmk["7"]["ratio"] is None and not lmk["7"]["informative"]
    vllm = spread["points"]["vllm-s @ main"]["by_seed"]["7"]  # llms kept everything resident, vllm-s did not
    assert vllm["ratio"] == pytest.approx(15.0) and not vllm["both_under_pressure"]
    assert spread["points"]["swapping @ main"]["by_seed"]["42"]["ratio"] is None  # its own run saw no pressure
    assert spread["points"]["vllm-sq @ 1x/8"]["by_seed"]["42"] == {"ratio": None, "why": "not run"}
