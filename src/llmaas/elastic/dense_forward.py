"""A differentiable batched causal forward over the dense fp32 weights: what offline work needs gradients through.

Owns: the training-time forward (Taylor importance needs dL/dW, LoRA training needs dL/dA, dL/dB) for full causal
sequences [B, T] under active widths and adapters, plus per-layer taps for layer-similarity scores. It is the same
math as model/transformer.py (a test holds them equal); the product path stays the inference Transformer, which
writes into preallocated buffers and so cannot carry autograd. Ignores: KV caches, kernels and decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from llmaas.model.config import ModelConfig
from llmaas.model.lora import LayerLora, ModelLora
from llmaas.model.transformer import ModelWeights, Transformer
from llmaas.model.widths import LayerWidths, ModelWidths

# (layer, hidden in [B,T,d], normed attention input, attention output, hidden out): taps for layer scores
LayerTap = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True, eq=False)
class DenseLayer:
    attn_norm: torch.Tensor
    wq: torch.Tensor  # [q_dim, d], group-major heads
    wk: torch.Tensor  # [kv_dim, d]
    wv: torch.Tensor
    wo: torch.Tensor  # [d, q_dim]
    ffn_norm: torch.Tensor
    wg: torch.Tensor  # [ffn, d]
    wu: torch.Tensor
    wd: torch.Tensor  # [d, ffn]


@dataclass(frozen=True, eq=False)
class DenseWeights:
    layers: tuple[DenseLayer, ...]
    embedding: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def expanded(cls, config: ModelConfig, w: ModelWeights) -> DenseWeights:
        """fp32 copies of the model's weights (the frozen base for LoRA training and importance scores). Offline only:
        about 4x the resident blocks' bytes, freed with this object."""
        q, kv, f = config.q_dim, config.kv_dim, config.ffn_dim
        layers = []
        for lw in w.layers:
            qkv, gate_up = lw.qkv.dequantized(), lw.gate_up.dequantized()
            layers.append(DenseLayer(lw.attn_norm, qkv[:q], qkv[q:q + kv], qkv[q + kv:], lw.o.dequantized(),
                                     lw.ffn_norm, gate_up[:f], gate_up[f:], lw.down.dequantized()))
        head = w.lm_head.dequantized()
        return cls(tuple(layers), head if w.embedding is w.lm_head else w.embedding.dequantized(), w.final_norm, head)

    def to(self, device: torch.device) -> DenseWeights:
        if device.type == "cpu":
            return self
        layers = tuple(DenseLayer(*(t.to(device) for t in vars(lw).values())) for lw in self.layers)
        return DenseWeights(layers, self.embedding.to(device), self.final_norm.to(device), self.lm_head.to(device))

    def trainable_layers(self) -> DenseWeights:
        """Copies of the layer matrices that require grad (for dL/dW); norms, embedding and head stay shared."""
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.detach().clone().requires_grad_(True)
        layers = tuple(replace(lw, wq=leaf(lw.wq), wo=leaf(lw.wo), wg=leaf(lw.wg), wu=leaf(lw.wu), wd=leaf(lw.wd))
                       for lw in self.layers)
        return replace(self, layers=layers)


def hidden_states(model: Transformer, weights: DenseWeights, ids: torch.Tensor, *, widths: ModelWidths | None = None,
                  lora: ModelLora | None = None, tap: LayerTap | None = None) -> torch.Tensor:
    """Final-normed hidden states [B, T, d] of token ids [B, T] (each row its own sequence from position 0)."""
    c = model.config
    positions = torch.arange(ids.shape[1], device=ids.device)
    model.rope.check(positions)
    h = weights.embedding[ids]
    for i, lw in enumerate(weights.layers):
        width = widths.layers[i] if widths is not None else LayerWidths((c.heads_per_group,) * c.n_kv_heads,
                                                                         c.ffn_dim)
        layer_lora = lora.layers[i] if lora is not None else None
        scale = lora.scale if lora is not None else 0.0
        h_in = h
        x = F.rms_norm(h, (c.d_model,), lw.attn_norm, c.norm_eps)
        attn = _attention(model, lw, x, positions, width, layer_lora, scale)
        h = h + attn
        if width.ffn:
            x2 = F.rms_norm(h, (c.d_model,), lw.ffn_norm, c.norm_eps)
            h = h + _ffn(lw, x2, width.ffn, layer_lora, scale)
        if tap is not None:
            tap(i, h_in, x, attn, h)
    return F.rms_norm(h, (c.d_model,), weights.final_norm, c.norm_eps)


def logits(model: Transformer, weights: DenseWeights, ids: torch.Tensor, **kw) -> torch.Tensor:
    return hidden_states(model, weights, ids, **kw) @ weights.lm_head.t()


def causal_lm_loss(model: Transformer, weights: DenseWeights, ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   **kw) -> torch.Tensor:
    """Mean next-token cross-entropy over ids [B, T]; loss_mask [B, T] (bool) marks the target tokens that count."""
    out = logits(model, weights, ids[:, :-1], **kw)
    targets = ids[:, 1:]
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask[:, 1:], -100)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _lora(layer_lora: LayerLora | None, name: str, x: torch.Tensor, scale: float) -> torch.Tensor | None:
    if layer_lora is None or name not in layer_lora.pairs:
        return None
    return layer_lora.pairs[name].delta(x, scale)


def _project(w: torch.Tensor, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.t()
    return y if extra is None else y + extra


def _attention(model: Transformer, lw: DenseLayer, x: torch.Tensor, positions: torch.Tensor, width: LayerWidths,
               layer_lora: LayerLora | None, scale: float) -> torch.Tensor:
    """Attention output [B, T, d] over the active query heads (each group's prefix) against its one K/V head."""
    c = model.config
    b, t, _ = x.shape
    if sum(width.q_heads) == 0:
        return torch.zeros_like(x)
    group = c.heads_per_group * c.head_dim
    rows = [torch.arange(g * group, g * group + kept * c.head_dim) for g, kept in enumerate(width.q_heads)]
    rows_q = torch.cat(rows)
    q = _project(lw.wq[rows_q], x, _lora(layer_lora, "q", x, scale))
    k = _project(lw.wk, x, _lora(layer_lora, "k", x, scale)).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
    v = _project(lw.wv, x, _lora(layer_lora, "v", x, scale)).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
    k = model.rope.rotated(k, positions)
    outs, r = [], 0
    for g, kept in enumerate(width.q_heads):
        if not kept:
            continue
        qg = q[..., r:r + kept * c.head_dim].reshape(b, t, kept, c.head_dim).transpose(1, 2)
        r += kept * c.head_dim
        qg = model.rope.rotated(qg, positions)
        kg, vg = k[:, g:g + 1].expand(b, kept, t, c.head_dim), v[:, g:g + 1].expand(b, kept, t, c.head_dim)
        og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=c.head_dim ** -0.5)
        outs.append(og.transpose(1, 2).reshape(b, t, kept * c.head_dim))
    attn = torch.cat(outs, dim=-1)  # [B, T, active q] in LoRA's (group-major prefix) order
    return _project(lw.wo[:, rows_q], attn, _lora(layer_lora, "o", attn, scale))


def _ffn(lw: DenseLayer, x: torch.Tensor, kept: int, layer_lora: LayerLora | None, scale: float) -> torch.Tensor:
    gate = _project(lw.wg[:kept], x, _lora(layer_lora, "gate", x, scale))
    up = _project(lw.wu[:kept], x, _lora(layer_lora, "up", x, scale))
    act = F.silu(gate) * up
    return _project(lw.wd[:, :kept], act, _lora(layer_lora, "down", act, scale))
