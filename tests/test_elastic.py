"""ElastiLM's model side: reordering keeps the model, level views equal physically pruned copies, levels are nested
and switching allocates nothing, LoRA equals merged weights, the training forward equals the product forward,
training resumes exactly, and the artifact and baselines follow their rules."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from conftest import fp32_cache
from llmaas.elastic import dense_forward as df
from llmaas.elastic.artifact import ElasticArtifact
from llmaas.elastic.baselines import attn_drop_counts, baseline_widths
from llmaas.elastic.build import build_artifact
from llmaas.elastic.importance import taylor_importance
from llmaas.elastic.layer_scores import LayerScores
from llmaas.elastic.lora_data import Example, Split
from llmaas.elastic.lora_train import LevelTrainer, TrainConfig
from llmaas.elastic.model import ElasticModel
from llmaas.elastic.model_levels import MODEL_LEVELS, kept_counts, level_widths, parse_model_level
from llmaas.elastic.reorder import layer_order, reorder_
from llmaas.errors import InvalidRequestError
from llmaas.model.linear import FP32, Linear
from llmaas.model.loader import load_model
from llmaas.model.lora import ModelLora
from llmaas.model.transformer import LayerWeights, ModelWeights, Transformer
from llmaas.model.widths import LayerWidths, ModelWidths
from tiny_gguf import write_tiny_llama

IDS = torch.tensor([5, 17, 200, 3, 99, 250, 12, 8, 1, 0, 44, 61])


def _logits(loaded, ids, **kw):
    n = ids.numel()
    return loaded.model.forward(ids, torch.arange(n), fp32_cache(loaded, 32).append(n), **kw)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("elastic") / "tiny.gguf", QType.Q4_1)


def _orders(loaded, batch):
    imp = taylor_importance(loaded.model, batch)
    return {i: layer_order(loaded.config, imp.heads[i], imp.neurons[i]) for i in range(loaded.config.n_layers)}


def test_reordered_full_model_gives_the_original_logits(tiny_path, kernels):
    original, reordered = load_model(tiny_path, gemm=FP32), load_model(tiny_path, gemm=FP32)
    orders = _orders(original, torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0)))
    assert any(not torch.equal(o.neurons, torch.arange(o.neurons.numel())) for o in orders.values())
    reorder_(reordered.config, reordered.model.weights, orders)
    a, b = _logits(original, IDS), _logits(reordered, IDS)  # dense path: exact up to summation order
    assert (a - b).abs().max().item() <= 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1))
    # decode path: q/o/gate/up blocks move whole (bit-exact); down's columns are re-quantised to Q8_0
    a, b = _logits(original, IDS[:3]), _logits(reordered, IDS[:3])
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


def test_reordered_smollm_matches_on_the_calibration_text(smollm_dense):
    from llmaas.elastic.calibration import CalibrationConfig, calibration_batch
    reordered = load_model(use_kernels=False)
    batch = calibration_batch(reordered.tokenizer, CalibrationConfig(num_samples=2, num_tokens=32))
    reorder_(reordered.config, reordered.model.weights, _orders(reordered, batch))
    weights = df.DenseWeights.expanded
    with torch.no_grad():
        a = df.logits(smollm_dense.model, weights(smollm_dense.config, smollm_dense.model.weights), batch)
        b = df.logits(reordered.model, weights(reordered.config, reordered.model.weights), batch)
    assert (a - b).abs().max().item() <= 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_reordering_after_decode_leaves_no_stale_decode_plan(tiny_path, kernels):
    """The native decode step's plans hold the weight blocks they were built on; reordering replaces down's blocks
    (re-quantised to Q8_0), and the model must then decode exactly as one reordered before it ever decoded."""
    decoded_first, fresh = load_model(tiny_path, gemm=FP32), load_model(tiny_path, gemm=FP32)
    orders = _orders(fresh, torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0)))
    _logits(decoded_first, IDS[:3])  # builds the plans on the original blocks
    assert decoded_first.model._decode_steps(None, None) is not None
    for loaded in (decoded_first, fresh):
        reorder_(loaded.config, loaded.model.weights, orders)
        loaded.model.weights_changed()
    assert torch.equal(_logits(decoded_first, IDS[:3]), _logits(fresh, IDS[:3]))


def test_level_table_matches_the_spec(smollm_dense):
    counts = [kept_counts(smollm_dense.config, m) for m in MODEL_LEVELS]
    assert counts == [(1, 160), (2, 192), (3, 384), (4, 576), (5, 768), (6, 960), (7, 1152), (8, 1344), (9, 1536)]
    assert parse_model_level("0.4") == 4 and parse_model_level("7") == 7
    for bad in ("0.25", "1.1", "x", "0"):
        with pytest.raises(InvalidRequestError):
            parse_model_level(bad)


def test_levels_are_nested_and_anchors_stay_full(smollm_dense):
    c = smollm_dense.config
    importance = torch.rand(c.n_layers, c.n_heads, generator=torch.Generator().manual_seed(1))
    importance = importance.view(c.n_layers, c.n_kv_heads, -1).sort(-1, descending=True).values.flatten(1)
    widths = [level_widths(c, importance, {0, 5}, m) for m in MODEL_LEVELS]
    for small, big in itertools.pairwise(widths):
        for ws, wb in zip(small.layers, big.layers, strict=True):
            assert ws.ffn <= wb.ffn and all(a <= b for a, b in zip(ws.q_heads, wb.q_heads, strict=True))
    for w in widths:
        assert w.layers[0] == w.layers[5] == LayerWidths((3, 3, 3), 1536)
    assert sum(widths[0].layers[1].q_heads) == 1 and widths[-1] == ModelWidths.full(c)


def _pruned_reference(loaded, orders, widths: ModelWidths, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a physically pruned copy of the ORIGINAL weights: the kept units gathered by original index."""
    c, w = loaded.config, loaded.model.weights
    h = w.embedding.lookup(ids)[None]
    positions = torch.arange(ids.numel())
    for i, (lw, lwid) in enumerate(zip(w.layers, widths.layers, strict=True)):
        heads = [int(orders[i].heads[g * c.heads_per_group + j]) for g, k in enumerate(lwid.q_heads) for j in range(k)]
        neurons = orders[i].neurons[:lwid.ffn]
        rows = torch.cat([torch.arange(hh * c.head_dim, (hh + 1) * c.head_dim) for hh in heads])
        qkv = lw.qkv.dequantized()
        wq, wo = qkv[:c.q_dim][rows], lw.o.dequantized()[:, rows]
        wk, wv = qkv[c.q_dim:c.q_dim + c.kv_dim], qkv[c.q_dim + c.kv_dim:]
        x = F.rms_norm(h, (c.d_model,), lw.attn_norm, c.norm_eps)
        k = loaded.model.rope.rotated((x @ wk.t()).view(1, -1, c.n_kv_heads, c.head_dim).transpose(1, 2), positions)
        v = (x @ wv.t()).view(1, -1, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q = loaded.model.rope.rotated((x @ wq.t()).view(1, -1, len(heads), c.head_dim).transpose(1, 2), positions)
        group = torch.tensor([hh // c.heads_per_group for hh in heads])
        attn = F.scaled_dot_product_attention(q, k[:, group], v[:, group], is_causal=True)
        h = h + attn.transpose(1, 2).reshape(1, -1, len(heads) * c.head_dim) @ wo.t()
        x = F.rms_norm(h, (c.d_model,), lw.ffn_norm, c.norm_eps)
        gate_up = lw.gate_up.dequantized()
        gate, up = gate_up[:c.ffn_dim][neurons], gate_up[c.ffn_dim:][neurons]
        h = h + (F.silu(x @ gate.t()) * (x @ up.t())) @ lw.down.dequantized()[:, neurons].t()
    return loaded.model.logits(h[0])


def test_level_view_equals_a_physically_pruned_copy(tiny_path):
    original, reordered = load_model(tiny_path, use_kernels=False), load_model(tiny_path, use_kernels=False)
    c = original.config
    orders = _orders(original, torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0)))
    reorder_(c, reordered.model.weights, orders)
    widths = ModelWidths((LayerWidths((2, 0), 96), LayerWidths((1, 1), 32)))
    view = _logits(reordered, IDS, widths=widths)
    with torch.no_grad():
        reference = _pruned_reference(original, orders, widths, IDS)
    assert (view - reference).abs().max().item() <= 1e-4


def _tiny_elastic(path, tmp_path, adapters=None) -> ElasticModel:
    fresh = load_model(path)
    build_artifact(fresh, tmp_path, log=lambda *_: None)
    return ElasticModel(load_model(path), ElasticArtifact.load(tmp_path, fresh.model_id), adapters or {}, tmp_path)


def test_switching_levels_allocates_nothing(tiny_path, tmp_path):
    elastic = _tiny_elastic(tiny_path, tmp_path)
    w = elastic.loaded.model.weights
    tensors = [t for lw in w.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down) for t in
               (*((lin.dense,) if lin.dense is not None else ()),
                *(vars(lin.blocks).values() if lin.blocks is not None else ()))]
    pointers = [t.data_ptr() for t in tensors]
    assert elastic.view(4) is elastic.view(4)
    for m in MODEL_LEVELS:  # run every level, decode and prefill paths
        sub = elastic.view(m)
        _logits(elastic.loaded, IDS, widths=sub.widths)
        _logits(elastic.loaded, IDS[:2], widths=sub.widths)
    assert [t.data_ptr() for t in tensors] == pointers
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2000):
        elastic.view(MODEL_LEVELS[i % len(MODEL_LEVELS)])
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert after - before < 1024


def _merged(weights: ModelWeights, lora: ModelLora, widths: ModelWidths, c) -> ModelWeights:
    """A copy with every adapter folded into the active rows/columns of its weight (dense only)."""
    layers = []
    for lw, la, wd in zip(weights.layers, lora.layers, widths.layers, strict=True):
        qkv, o, gu, down = (lin.dequantized() for lin in (lw.qkv, lw.o, lw.gate_up, lw.down))
        group = c.heads_per_group * c.head_dim
        q_rows = torch.cat([torch.arange(g * group, g * group + k * c.head_dim) for g, k in enumerate(wd.q_heads)])
        d = {n: lora.scale * p.b @ p.a for n, p in la.pairs.items()}
        qkv[q_rows] += d["q"]
        qkv[c.q_dim:c.q_dim + c.kv_dim] += d["k"]
        qkv[c.q_dim + c.kv_dim:] += d["v"]
        o[:, q_rows] += d["o"]
        gu[:wd.ffn] += d["gate"]
        gu[c.ffn_dim:c.ffn_dim + wd.ffn] += d["up"]
        down[:, :wd.ffn] += d["down"]
        layers.append(LayerWeights(lw.attn_norm, Linear(qkv, None), Linear(o, None), lw.ffn_norm,
                                   Linear(gu, None), Linear(down, None)))
    return ModelWeights(weights.embedding, tuple(layers), weights.final_norm, weights.lm_head, None)


def _random_lora(c, widths) -> ModelLora:
    lora = ModelLora.init(c, widths, 4, 8.0, torch.Generator().manual_seed(3))
    for t in lora.tensors().values():
        t.normal_(0, 0.05, generator=torch.Generator().manual_seed(t.numel()))
    return lora


def test_lora_equals_merged_weights(tiny_path):
    loaded = load_model(tiny_path, use_kernels=False)
    c = loaded.config
    widths = ModelWidths((LayerWidths((1, 2), 64), LayerWidths((0, 1), 128)))
    lora = _random_lora(c, widths)
    merged = Transformer(c, _merged(loaded.model.weights, lora, widths, c), None)
    for rows in (IDS, IDS[:3]):
        n = rows.numel()
        a = _logits(loaded, rows, widths=widths, lora=lora)
        b = merged.forward(rows, torch.arange(n), fp32_cache(loaded, 32).append(n), widths=widths)
        assert (a - b).abs().max().item() <= 1e-4
        assert (a - _logits(loaded, rows, widths=widths)).abs().max().item() > 1e-2  # the adapter does something


def test_lora_on_the_decode_kernels_equals_the_dense_path(tiny_path, kernels):
    """A few rows take the native LoRA kernel (one call per adapter group, ranges of active heads and neurons); it
    adds what the dense path's GEMMs add, up to the block kernels' activation rounding of the base weights."""
    native, dense = load_model(tiny_path), load_model(tiny_path, use_kernels=False)
    widths = ModelWidths((LayerWidths((1, 2), 64), LayerWidths((2, 0), 128)))
    lora = _random_lora(native.config, widths)
    for rows in (IDS[:1], IDS[:5]):
        a = _logits(native, rows, widths=widths, lora=lora)
        err = (a - _logits(dense, rows, widths=widths, lora=lora)).abs().max().item()
        assert err < 1e-3
        assert (a - _logits(native, rows, widths=widths)).abs().max().item() > 100 * err  # the adapter is applied


def test_lora_for_another_level_is_refused(tiny_path):
    loaded = load_model(tiny_path, use_kernels=False)
    widths = ModelWidths((LayerWidths((1, 2), 64), LayerWidths((0, 1), 128)))
    with pytest.raises(InvalidRequestError, match="adapter"):
        _logits(loaded, IDS, widths=ModelWidths.full(loaded.config), lora=_random_lora(loaded.config, widths))


def test_training_forward_equals_the_product_forward(tiny_path):
    loaded = load_model(tiny_path, use_kernels=False)
    widths = ModelWidths((LayerWidths((2, 1), 96), LayerWidths((1, 0), 0)))
    lora = _random_lora(loaded.config, widths)
    with torch.no_grad():
        a = df.logits(loaded.model, df.DenseWeights.expanded(loaded.config, loaded.model.weights), IDS[None],
                      widths=widths, lora=lora)[0]
    assert (a - _logits(loaded, IDS, widths=widths, lora=lora)).abs().max().item() <= 1e-4


def _split() -> Split:
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(0, 256, (12,), generator=g), torch.ones(12, dtype=torch.bool)) for _ in range(12)]
    return Split(examples[:8], examples[8:])


def test_training_resumes_exactly_from_a_checkpoint(tiny_path, tmp_path):
    loaded = load_model(tiny_path, use_kernels=False)
    widths = ModelWidths((LayerWidths((1, 1), 64), LayerWidths((2, 0), 32)))
    cfg = TrainConfig(steps=4, micro_batch=2, accumulation=2, warmup_steps=1, eval_every=2, held_out=4, lr=1e-2)
    straight = LevelTrainer(loaded, widths, _split(), cfg, tmp_path / "a.pt").train(log=lambda *_: None)
    first = LevelTrainer(loaded, widths, _split(), cfg, tmp_path / "b.pt")
    first.train(log=lambda *_: None, until_step=2)
    resumed = LevelTrainer(loaded, widths, _split(), cfg, tmp_path / "b.pt")
    assert resumed.step == 2
    again = resumed.train(log=lambda *_: None)
    for k, v in straight.tensors().items():
        assert torch.allclose(v, again.tensors()[k], atol=1e-6), k
    assert resumed.best_loss < resumed.base_loss  # four steps at a high rate already lower the held-out loss


def test_artifact_round_trip_and_fingerprint(tiny_path, tmp_path):
    fresh = load_model(tiny_path, use_kernels=False)
    built = build_artifact(fresh, tmp_path, log=lambda *_: None)
    loaded = ElasticArtifact.load(tmp_path, fresh.model_id)
    assert loaded.scores == built.scores and loaded.anchors == built.anchors and loaded.levels == built.levels
    assert all(torch.equal(loaded.orders[i].neurons, built.orders[i].neurons) for i in built.orders)
    assert torch.equal(loaded.neuron_importance, built.neuron_importance)
    with pytest.raises(Exception, match="built for"):
        ElasticArtifact.load(tmp_path, "another-model:0")


def test_baseline_rules():
    assert attn_drop_counts(32, 0.2) == (15, 31)  # the artifact's reported search result
    assert attn_drop_counts(30, 0.6) == (0, 18)
    n = 30
    scores = LayerScores(1.0, tuple(float(i) for i in range(n)), tuple(float(n - i) for i in range(n)),
                         tuple(float(i % 7) for i in range(n)))

    class _M:  # the baselines read only the config
        from types import SimpleNamespace
        config = SimpleNamespace(n_layers=n, heads_per_group=3, n_kv_heads=3, ffn_dim=1536)

    for method in ("layer_reduction", "shortgpt"):
        w = baseline_widths(_M, scores, method, 0.5)
        kept = [i for i, lw in enumerate(w.layers) if lw.ffn]
        assert len(kept) == 15
    assert [i for i, lw in enumerate(baseline_widths(_M, scores, "layer_reduction", 0.5).layers) if lw.ffn] == \
        list(range(15, 30))  # the largest leave-one-out losses
    assert [i for i, lw in enumerate(baseline_widths(_M, scores, "shortgpt", 0.5).layers) if lw.ffn] == \
        list(range(15))  # the largest block influence
    w = baseline_widths(_M, scores, "attn_drop", 0.6)
    assert sum(lw.ffn == 0 for lw in w.layers) == 18 and all(sum(lw.q_heads) == 9 for lw in w.layers)
