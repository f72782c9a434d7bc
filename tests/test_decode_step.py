"""The native decode step (kernels.cpp: decode_layers, every layer in one call) against the per-kernel path it
replaces (Transformer._layer, a kernel call at a time): the same logits and the same cached KV, bit for bit, for the
whole model, for sub-models with adapters (heads and neurons pruned, a layer with no heads, one with no FFN), for
several rows at once with attention statistics; and the step's plans refuse what does not fit."""

from __future__ import annotations

import pytest
import torch

from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.lora import ModelLora
from llmaas.model.widths import LayerWidths, ModelWidths


def _decode(model, native: bool, widths, lora, rows: int, steps: int, stats: bool):
    """Logits of `steps` passes of `rows` new tokens each after a 40-token prompt, and the cache they leave."""
    model.native_step = native
    cache = DenseKVCache(KVSpec.from_config(model.config), 40 + rows * steps)
    if stats:
        cache.track_attention()
    gen = torch.Generator().manual_seed(5)
    out = []
    try:
        with torch.no_grad():
            prompt = torch.randint(0, model.config.vocab_size, (40,), generator=gen)
            model.forward(prompt, torch.arange(40), cache.append(40), widths=widths, lora=lora)
            for i in range(steps):
                ids = torch.randint(0, model.config.vocab_size, (rows,), generator=gen)
                positions = torch.arange(40 + i * rows, 40 + (i + 1) * rows)
                view = cache.append(rows)
                out.append(model.forward(ids, positions, view, widths=widths, lora=lora, stats=cache.stats_view()))
    finally:
        model.native_step = True
    return torch.stack(out), cache


def _pruned(c) -> ModelWidths:
    gen = torch.Generator().manual_seed(11)
    layers = []
    for i in range(c.n_layers):
        heads = tuple(int(h) for h in torch.randint(0, c.heads_per_group + 1, (c.n_kv_heads,), generator=gen))
        ffn = int(torch.randint(1, c.ffn_dim, (1,), generator=gen))  # any count, not only whole blocks
        if i == 1:
            heads = (0,) * c.n_kv_heads  # no attention at all
        if i == 2:
            ffn = 0  # no FFN
        if i == 3:
            heads, ffn = (c.heads_per_group,) * c.n_kv_heads, c.ffn_dim  # a full layer inside a sub-model
        layers.append(LayerWidths(heads, ffn))
    return ModelWidths(tuple(layers))


def _adapter(c, widths) -> ModelLora:
    lora = ModelLora.init(c, widths, 8, 16.0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    for layer in lora.layers:
        for pair in layer.pairs.values():
            pair.b.copy_(torch.randn(pair.b.shape, generator=gen) * 0.05)  # B starts at zero: give it a real delta
    return lora


def _assert_same(a, b) -> None:
    (logits_a, cache_a), (logits_b, cache_b) = a, b
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(x, y) for x, y in zip(cache_a.kv, cache_b.kv, strict=True))
    if cache_a.attention is not None:
        assert torch.equal(cache_a.attention.prob_sum, cache_b.attention.prob_sum)
        assert torch.equal(cache_a.attention.row_count, cache_b.attention.row_count)


def test_the_whole_model_decodes_the_same_bits_in_one_call(smollm, kernels):
    model = smollm.model
    assert model._decode_steps(None, None) is not None  # the native step runs (no silent fallback)
    _assert_same(_decode(model, False, None, None, 1, 4, False), _decode(model, True, None, None, 1, 4, False))


@pytest.mark.parametrize("rows, stats, served", [(1, False, True), (3, True, True), (1, False, False)])
def test_a_sub_model_with_adapters_decodes_the_same_bits_in_one_call(smollm, kernels, rows, stats, served):
    """Adapters as served (fp16) and as trained (fp32)."""
    model = smollm.model
    widths = _pruned(model.config)
    lora = _adapter(model.config, widths)
    lora = lora.served() if served else lora
    assert model._decode_steps(widths, lora) is not None
    ours = _decode(model, True, widths, lora, rows, 3, stats)
    _assert_same(_decode(model, False, widths, lora, rows, 3, stats), ours)
    # and the adapter changes the result: the step did not drop it
    assert not torch.equal(ours[0], _decode(model, True, widths, None, rows, 3, stats)[0])


def test_a_layer_step_refuses_a_matrix_of_the_wrong_shape(smollm, kernels):
    c, lw = smollm.config, smollm.model.weights.layers[0]

    def blocks(lin):
        b = lin.blocks
        return b.qs, b.scales, getattr(b, "mins", None)

    dims = [c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim]
    full = [c.heads_per_group] * c.n_kv_heads
    mats = [blocks(lw.qkv), blocks(lw.o), blocks(lw.gate_up), blocks(lw.down)]
    kernels.make_layer_step(dims, lw.attn_norm, lw.ffn_norm, mats, False, [], [], full, c.ffn_dim, [], 0.0)
    with pytest.raises(RuntimeError, match="wrong shape"):
        kernels.make_layer_step(dims, lw.attn_norm, lw.ffn_norm, [mats[1], *mats[1:]], False, [], [], full,
                                c.ffn_dim, [], 0.0)
    with pytest.raises(RuntimeError, match="active head count"):
        kernels.make_layer_step(dims, lw.attn_norm, lw.ffn_norm, mats, False, [], [], [9] * c.n_kv_heads,
                                c.ffn_dim, [], 0.0)
