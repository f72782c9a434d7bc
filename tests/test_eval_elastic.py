"""The elastic evaluation's scoring: batched choices equal scoring each choice alone, and the statistics behave."""

from __future__ import annotations

import torch

from conftest import fp32_cache
from llmaas.bench.eval_elastic import Setting, largest_meeting, paired_bootstrap, wilson
from llmaas.elastic.choices import choice_scores


def test_choices_in_one_pass_equal_each_choice_alone(smollm_dense):
    tok, model = smollm_dense.tokenizer, smollm_dense.model
    context = tok.encode("Answer the question.\n\n")
    question = tok.encode("Question: What is the capital of France?\nAnswer:", add_bos=False)
    choices = [tok.encode(c, add_bos=False) for c in (" Paris", " the city of Lyon", " Berlin in Germany", " a")]
    cache = fp32_cache(smollm_dense, 64)
    model.forward(torch.tensor(context), torch.arange(len(context)), cache.append(len(context)))
    batched = choice_scores(model, cache, question, choices, None, None)
    assert cache.num_tokens == len(context)  # scoring never writes the shared context's cache
    alone = []
    for c in choices:
        ids = context + question + c
        logp = torch.log_softmax(model.forward(torch.tensor(ids), torch.arange(len(ids)),
                                               fp32_cache(smollm_dense, 64).append(len(ids))), -1)
        start = len(context) + len(question)
        alone.append(sum(logp[start - 1 + j, c[j]].item() for j in range(len(c))) / len(c))
    assert max(abs(a - b) for a, b in zip(batched, alone, strict=True)) < 1e-4
    assert max(range(4), key=batched.__getitem__) == 0


def test_wilson_and_paired_bootstrap():
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and abs((hi - lo) - 0.19) < 0.01
    same = {"t": [True, False] * 20}
    d, lo, hi = paired_bootstrap([(same, same)], 500)
    assert d == lo == hi == 0
    better = {"t": [True] * 40}
    d, lo, hi = paired_bootstrap([(better, same)], 500)
    assert d == 0.5 and lo > 0
    # pooling averages the pairs' differences item by item: opposite pairs cancel exactly, in every resample
    d, lo, hi = paired_bootstrap([(better, same), (same, better)], 500)
    assert d == lo == hi == 0
    # two noisy pairs pooled give a narrower interval than either alone when their errors are independent
    a1, a2 = {"t": [i % 3 == 0 for i in range(90)]}, {"t": [i % 3 == 1 for i in range(90)]}
    b1 = {"t": [i % 2 == 0 for i in range(90)]}
    one = paired_bootstrap([(a1, b1)], 2000)
    pooled = paired_bootstrap([(a1, b1), (a2, b1)], 2000)
    assert pooled[2] - pooled[1] < one[2] - one[1]


def test_each_system_takes_its_largest_setting_that_meets_the_budget():
    options = [(0.20, {}, Setting("shortgpt", 0.4)), (0.26, {}, Setting("shortgpt", 0.5)),
               (0.25, {}, Setting("shortgpt", 0.6)), (0.31, {}, Setting("shortgpt", 0.7))]
    assert largest_meeting(options, 0.30)[2].ratio == 0.6  # 0.6 timed faster than 0.5: by size, not by TTFT
    assert largest_meeting(options, 0.255)[2].ratio == 0.6
    assert largest_meeting(options, 0.24)[2].ratio == 0.4
    assert largest_meeting(options, 0.31)[2].ratio == 0.7  # meeting the SLO includes equality
    assert largest_meeting(options, 0.19) is None  # misses the SLO


def test_trace_class_counts_follow_the_spec_table():
    from llmaas.bench.elastic_serving import trace_counts
    assert trace_counts(0.0) == [100] * 6
    assert trace_counts(0.25) == [48, 62, 80, 103, 133, 170]
    assert trace_counts(-0.25) == [170, 133, 103, 80, 62, 48]
