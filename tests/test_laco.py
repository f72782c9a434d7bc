"""LaCo (ELASTILM.md §10.5): the RDSC merge as a mix of original layers, the walk stopping at exactly ⌊r·L⌋ layers,
and the served collapsed model computing what its plan says."""

from __future__ import annotations

import torch

from conftest import SHARED_DATA, fp32_cache
from llmaas.elastic.dense_forward import DenseWeights, hidden_states
from llmaas.elastic.laco import MergedLayer, _Dense, collapse, laco_model, merge, snippets


def test_a_merge_is_the_base_plus_the_differences_and_merges_compose():
    layers = [MergedLayer.original(i) for i in range(8)]
    once = merge(layers, 2, 3)
    assert len(once) == 5 and once[2] == MergedLayer(2, ((2, -2.0), (3, 1.0), (4, 1.0), (5, 1.0)))
    assert once[:2] == layers[:2] and once[3:] == layers[6:]
    # merging a merged layer into a base adds its difference to the base: linear in the original layers
    twice = merge(once, 1, 2)
    assert twice[1] == MergedLayer(1, ((1, -1.0), (2, -2.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0)))


def test_merged_weights_follow_rdsc_and_keep_the_base_norms(smollm):
    dense = DenseWeights.expanded(smollm.config, smollm.model.weights)
    merged = merge([MergedLayer.original(i) for i in range(smollm.config.n_layers)], 5, 3)[5]
    got, src = _Dense(dense).layer(merged), dense.layers
    want = src[5].wg + sum(src[k].wg - src[5].wg for k in (6, 7, 8))
    assert torch.allclose(got.wg, want, atol=1e-5)
    assert got.ffn_norm is src[5].ffn_norm and got.attn_norm is src[5].attn_norm


def test_the_walk_stops_at_exactly_the_kept_layers(smollm):
    dense = DenseWeights.expanded(smollm.config, smollm.model.weights)
    ids = [torch.tensor(smollm.tokenizer.encode(t)) for t in snippets(SHARED_DATA)[:2]]
    n = smollm.config.n_layers
    layers, tries = collapse(smollm.model, dense, ids, n - 2, start_threshold=-10.0)  # every try accepted
    assert len(layers) == n - 2 and len(tries) == 1  # only 2 merged: the walk never passes ⌊r·L⌋
    assert tries[0]["base"] == n - 5 and tries[0]["merged"] == 2 and tries[0]["accepted"]
    assert layers[n - 5].mix == ((n - 5, -1.0), (n - 4, 1.0), (n - 3, 1.0))
    same, none = collapse(smollm.model, dense, ids, n)
    assert none == [] and all(m.is_original for m in same)


def test_the_collapsed_model_computes_its_plan(smollm):
    """Unmerged: the very model (shared layers, same logits). Merged: the plan's dense math within Q8_0 rounding."""
    c = smollm.config
    ids = torch.tensor(smollm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is"))
    def run(model):
        return model.forward(ids, torch.arange(len(ids)), fp32_cache(smollm, 64).append(len(ids)))
    whole = laco_model(smollm, [MergedLayer.original(i) for i in range(c.n_layers)])
    assert torch.equal(run(whole), run(smollm.model))
    plan = merge([MergedLayer.original(i) for i in range(c.n_layers)], 20, 3)
    dense = DenseWeights.expanded(c, smollm.model.weights)
    model = laco_model(smollm, plan, dense)
    assert model.config.n_layers == c.n_layers - 3 and model.weights.layers[0] is smollm.model.weights.layers[0]
    want = hidden_states(model, _Dense(dense).weights(plan), ids[None])[0] @ dense.lm_head.t()
    got = run(model)
    assert got.argmax(-1).eq(want.argmax(-1)).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_snippets_are_fixed_short_wikipedia_openings():
    texts = snippets(SHARED_DATA)
    assert len(texts) == 5 and texts == snippets(SHARED_DATA)
    assert all(len(t.split()) == 14 and "@" not in t for t in texts)
