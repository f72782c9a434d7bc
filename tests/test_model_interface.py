"""The model interface the memory manager and elastic serving build on: layer-by-layer execution, attention
statistics, active widths as zero-copy slices that equal a physically masked model."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QType

from conftest import fp32_cache
from llmaas.model.linear import FP32, Linear
from llmaas.model.loader import load_model
from llmaas.model.stats import AttentionStats
from llmaas.model.transformer import LayerWeights, ModelWeights, Transformer
from llmaas.model.widths import LayerWidths, ModelWidths
from tiny_gguf import write_tiny_llama

TEXT = "Chunks of the cache that get little attention can be compressed harder than the others."


def test_layer_by_layer_equals_forward(smollm):
    ids = torch.tensor(smollm.tokenizer.encode(TEXT))
    pos = torch.arange(ids.numel())
    full = smollm.model.forward(ids, pos, fp32_cache(smollm).append(ids.numel()))
    view = fp32_cache(smollm).append(ids.numel())
    h = smollm.model.embed(ids)
    for start, stop in [(0, 7), (7, 8), (8, 30)]:
        h = smollm.model.run_layers(h, pos, view, start, stop)
    assert torch.equal(smollm.model.logits(h), full)


def _check_stats(stats: AttentionStats, positions: torch.Tensor, key_positions: torch.Tensor, heads: int) -> None:
    # every (layer, head, row) distributes probability 1 over the keys it sees
    assert abs(stats.prob_sum.sum().item() - heads * positions.numel()) < 1e-2
    visible = (key_positions[None, :] <= positions[:, None]).sum(0).float()
    assert torch.equal(stats.row_count, visible * heads)


def test_attention_stats_on_both_paths(smollm_fp32, smollm_dense):
    smollm = smollm_fp32
    ids = torch.tensor(smollm.tokenizer.encode(TEXT))
    n, c = ids.numel(), smollm.config
    per_model = []
    for loaded in (smollm, smollm_dense):
        cache = fp32_cache(loaded)
        prefill = AttentionStats.zeros(n)
        loaded.model.forward(ids, torch.arange(n), cache.append(n), stats=prefill)
        _check_stats(prefill, torch.arange(n), torch.arange(n), c.n_layers * c.n_heads)
        step = AttentionStats.zeros(n + 1)
        loaded.model.forward(torch.tensor([42]), torch.tensor([n]), cache.append(1), stats=step)
        _check_stats(step, torch.tensor([n]), torch.arange(n + 1), c.n_layers * c.n_heads)
        per_model.append((prefill, step))
    # kernel path (one decode row) and dense path see the same probabilities
    assert torch.allclose(per_model[0][1].prob_sum, per_model[1][1].prob_sum, rtol=1e-3, atol=1e-4)
    # the first token is the attention sink: it receives the most attention
    assert per_model[1][0].density().argmax().item() == 0


def test_attention_stats_count_only_active_heads(smollm):
    ids = torch.tensor(smollm.tokenizer.encode(TEXT))[:6]
    c = smollm.config
    widths = ModelWidths((LayerWidths((1, 0, 2), c.ffn_dim),) * c.n_layers)
    for rows in (ids, ids[:2]):  # dense path and kernel path
        stats = AttentionStats.zeros(rows.numel())
        smollm.model.forward(rows, torch.arange(rows.numel()), fp32_cache(smollm).append(rows.numel()), widths=widths,
                             stats=stats)
        _check_stats(stats, torch.arange(rows.numel()), torch.arange(rows.numel()), c.n_layers * 3)


def _masked_weights(weights: ModelWeights, widths: ModelWidths, group: int, head_dim: int) -> ModelWeights:
    """A physical copy where dropped query heads' output columns and dropped FFN neurons' down columns are zero."""
    layers = []
    for lw, w in zip(weights.layers, widths.layers, strict=True):
        o, down = lw.o.dequantized(), lw.down.dequantized()
        for g, kept in enumerate(w.q_heads):
            o[:, (g * group + kept) * head_dim:(g + 1) * group * head_dim] = 0.0
        down[:, w.ffn:] = 0.0
        layers.append(LayerWeights(lw.attn_norm, Linear(lw.qkv.dequantized(), None), Linear(o, None),
                                   lw.ffn_norm, Linear(lw.gate_up.dequantized(), None), Linear(down, None)))
    head = Linear(weights.lm_head.dequantized(), None)
    return ModelWeights(head, tuple(layers), weights.final_norm, head, None)


def test_sliced_widths_equal_a_masked_copy(tmp_path, kernels):
    loaded = load_model(write_tiny_llama(tmp_path / "tiny.gguf", QType.Q4_1), gemm=FP32)
    c = loaded.config
    widths = ModelWidths((LayerWidths((1, 2), 200), LayerWidths((0, 1), 37)))
    masked = Transformer(c, _masked_weights(loaded.model.weights, widths, c.heads_per_group, c.head_dim), None)
    ids = torch.tensor([5, 17, 200, 3, 99, 250, 12, 8, 1, 0])
    for rows in (ids, ids[:3]):  # dense path, then the kernel path
        n = rows.numel()
        sliced = loaded.model.forward(rows, torch.arange(n), fp32_cache(loaded, 16).append(n), widths=widths)
        reference = masked.forward(rows, torch.arange(n), fp32_cache(loaded, 16).append(n))
        assert (sliced - reference).abs().max().item() < (1e-4 if n > 8 else 2e-3)


def test_zero_width_layer_is_identity(tmp_path):
    loaded = load_model(write_tiny_llama(tmp_path / "tiny.gguf"), use_kernels=False)
    c = loaded.config
    skip_last = ModelWidths((LayerWidths((2, 2), c.ffn_dim), LayerWidths((0, 0), 0)))
    ids = torch.tensor([5, 17, 200])
    view = fp32_cache(loaded, 8).append(3)
    h = loaded.model.run_layers(loaded.model.embed(ids), torch.arange(3), view, 0, 1)
    logits = loaded.model.forward(ids, torch.arange(3), fp32_cache(loaded, 8).append(3), widths=skip_last)
    assert torch.allclose(logits, loaded.model.logits(h), atol=1e-5)


def test_column_slices_do_not_copy_weights(smollm_dense):
    down = smollm_dense.model.weights.layers[0].down
    x, out = torch.randn(20, 384), torch.zeros(20, down.out_features)
    with torch.profiler.profile(profile_memory=True) as prof:
        down.apply(x, out, cols=(0, 384))
    allocated = sum(e.cpu_memory_usage for e in prof.key_averages() if e.cpu_memory_usage > 0)
    assert allocated < down.out_features * 384 * 4 // 4, f"{allocated} bytes allocated: the slice was copied"
    assert torch.allclose(out, x @ down.dequantized()[:, :384].T, atol=1e-4)
