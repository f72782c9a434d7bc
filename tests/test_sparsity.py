"""DejaVu-style contextual sparsity (ELASTILM.md §10.2): the predictor learns which neurons are active, each token
keeps exactly its top neurons, and keeping all of them is the model itself."""

from __future__ import annotations

import math

import torch

from conftest import SHARED_DATA, fp32_cache
from llmaas.elastic.dense_forward import DenseWeights
from llmaas.elastic.sparsity import (
    SparseGateUp,
    SparsityConfig,
    SparsityPredictor,
    build_predictor,
    ffn_inputs,
    load_predictor,
    sample_windows,
    sparse_model,
    train_predictor,
)


def test_each_token_keeps_exactly_its_top_predicted_neurons(smollm):
    c = smollm.config
    torch.manual_seed(0)
    predictor = SparsityPredictor(c.n_layers, c.d_model, c.ffn_dim)
    lin = smollm.model.weights.layers[3].gate_up
    kept = math.ceil(0.3 * c.ffn_dim)
    for rows in (1, 4, 40):  # the kernels' small batches and the GEMM path
        x = torch.randn(rows, c.d_model)
        plain, sparse = torch.empty(rows, 2 * c.ffn_dim), torch.empty(rows, 2 * c.ffn_dim)
        lin.apply(x, plain)
        SparseGateUp(lin, predictor.layers[3], kept).apply(x, sparse)
        assert torch.equal(sparse[:, :c.ffn_dim], plain[:, :c.ffn_dim])  # gate untouched
        top = predictor.logits(3, x).topk(kept, dim=1).indices
        up, want = sparse[:, c.ffn_dim:], torch.zeros(rows, c.ffn_dim)
        want.scatter_(1, top, plain[:, c.ffn_dim:].gather(1, top))
        assert torch.equal(up, want)


def test_keeping_every_neuron_is_the_model_and_fewer_changes_it(smollm):
    c = smollm.config
    predictor = SparsityPredictor(c.n_layers, c.d_model, c.ffn_dim)
    assert sparse_model(smollm, predictor, 1.0) is smollm.model
    ids = torch.tensor(smollm.tokenizer.encode("The quick brown fox jumps over the lazy dog"))
    def run(model):
        return model.forward(ids, torch.arange(len(ids)), fp32_cache(smollm, 32).append(len(ids)))
    full, half = run(smollm.model), run(sparse_model(smollm, predictor, 0.5))
    assert torch.isfinite(half).all() and not torch.allclose(full, half, atol=1e-2)


def test_the_predictor_learns_active_neurons_and_round_trips(smollm, tmp_path):
    cfg = SparsityConfig(windows=6, window_tokens=64, epochs=4, lr=3e-3, batch_tokens=64)
    windows = sample_windows(smollm, cfg, SHARED_DATA)
    assert windows.shape == (6, 64)
    dense = DenseWeights.expanded(smollm.config, smollm.model.weights)
    inputs = ffn_inputs(smollm, dense, windows, log=lambda _: None)[:3]  # the first 3 layers suffice
    _, quality = train_predictor(dense, inputs, cfg, 64, log=lambda _: None)
    # keeping as many neurons as are active, a random ranking recalls the active fraction; a trained one more
    assert all(r > a + 0.1 for r, a in zip(quality["held_out_recall"], quality["active_fraction"], strict=True))
    record = build_predictor(smollm, tmp_path, SparsityConfig(windows=2, window_tokens=32, epochs=1),
                             log=lambda _: None, data_dir=SHARED_DATA)
    loaded = load_predictor(tmp_path, smollm)
    assert record["windows"] == 2 and loaded is not None and len(loaded.layers) == smollm.config.n_layers
    assert load_predictor(tmp_path / "nothing", smollm) is None
