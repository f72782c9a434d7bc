"""Traces of the context-switching benchmark (LLMS spec §9, §11.15): determinism, arrivals, delta ranges, patterns."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from llmaas.bench.trace import DELTA_RANGES, Trace, TraceConfig, context_name, make_trace, task_of
from llmaas.engine.conversation import Conversation
from llmaas.errors import InvalidRequestError


@pytest.fixture(scope="module")
def conversation(smollm) -> Conversation:
    return Conversation(smollm.tokenizer, smollm.chat_template)


@pytest.fixture(scope="module")
def day3(conversation) -> Trace:
    """The default trace: 72 virtual hours, one call per 5 minutes, 8 contexts, Markov, seed 42."""
    return make_trace(TraceConfig(), conversation)


def test_same_seed_same_trace_other_seed_other_trace(conversation):
    config = TraceConfig("random", 6, seed=7, max_calls=30)
    assert make_trace(config, conversation) == make_trace(config, conversation)
    other = make_trace(dataclasses.replace(config, seed=8), conversation)
    assert [c.context for c in other.calls] != [c.context for c in make_trace(config, conversation).calls]


def test_arrivals_are_poisson_with_the_target_mean(day3):
    gaps = [c.gap_s for c in day3.calls]
    assert day3.calls[-1].time_s <= 72 * 3600
    assert abs(sum(gaps) / len(gaps) - 300) / 300 < 0.05
    # exponential gaps: the standard deviation equals the mean (within sampling error over ~860 gaps)
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert 0.85 < sd / mean < 1.15


def test_every_call_lies_in_its_tasks_delta_range_and_keeps_its_task(day3, conversation):
    for call in day3.calls:
        lo, hi = DELTA_RANGES[call.task]
        assert lo <= call.delta_tokens <= hi, call
        assert call.context.endswith(call.task)
    for call in day3.calls[:40]:  # the recorded delta is what the call really adds as a context's first turn
        assert len(conversation.prompt_ids([], call.user, starts_context=True)) + call.max_new_tokens == \
            call.delta_tokens
    assert {c.task for c in day3.calls} == set(DELTA_RANGES)
    assert [task_of(j) for j in range(6)] == list(DELTA_RANGES)  # round-robin in the paper's table order


def test_markov_depth_histogram_follows_theta(day3):
    depths = collections.Counter(c.depth for c in day3.calls if c.depth >= 0)
    n = sum(depths.values())
    norm = sum(0.5 ** d for d in range(8))
    for d in range(3):
        assert abs(depths[d] / n - 0.5 ** d / norm) < 0.05, (d, depths)


def test_random_is_uniform_and_gaussian_favours_moderate_tasks(conversation):
    rnd = collections.Counter(c.context for c in make_trace(TraceConfig("random", 6, max_calls=600),
                                                            conversation).calls)
    assert all(abs(k / 600 - 1 / 6) < 0.05 for k in rnd.values()), rnd
    gauss = collections.Counter(c.task for c in make_trace(TraceConfig("gaussian", 6, max_calls=600),
                                                           conversation).calls)
    # mean deltas 350/1500/200/750/300/55, mean 526, sd 485: expected shares ag_news .22, xsum .03, samsum .19,
    # cnn .21, wmt .21, sst2 .15 (xsum, farthest from the mean, least; sst2, next farthest, next)
    assert gauss["xsum"] < 35 and gauss.most_common()[-1][0] == "xsum"
    assert min(gauss["ag_news"], gauss["cnn_dailymail"], gauss["wmt17_de_en"]) > gauss["sst2"] > gauss["xsum"]


def test_save_and_load_round_trip(tmp_path, conversation):
    trace = make_trace(TraceConfig("gaussian", 3, max_calls=10), conversation)
    trace.save(tmp_path / "t.jsonl")
    assert Trace.load(tmp_path / "t.jsonl") == trace
    (tmp_path / "bad.jsonl").write_text('{"kind": "other"}\n')
    with pytest.raises(InvalidRequestError, match="not an llmaas trace"):
        Trace.load(tmp_path / "bad.jsonl")


def test_bad_configs_are_refused():
    with pytest.raises(InvalidRequestError, match="pattern"):
        TraceConfig("zipf")
    with pytest.raises(InvalidRequestError, match="contexts"):
        TraceConfig(contexts=0)
    assert context_name(7) == "c07-xsum"
