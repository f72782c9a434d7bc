"""One-shot reordering: permute each elastic layer's units into descending importance, in place, once.

Owns the orders (query heads sorted within their KV group, FFN neurons sorted) and their application to both
weight copies: q rows and o columns by whole heads, gate/up rows and down columns by neuron. Rows and whole-block
column moves keep the 4/8-bit block copy bit-exact; a column order that splits blocks (FFN neurons in down) gets
its block copy re-quantised to Q8_0 from the exact fp32 copy (documented: decode then differs by Q8 rounding).
The model is functionally unchanged. Ignores which layers are elastic (the caller passes the orders).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmaas.model.config import ModelConfig
from llmaas.model.linear import Linear
from llmaas.model.transformer import ModelWeights
from llmaas.model.weights import BLOCK, Q4Blocks, quantize_q8


@dataclass(frozen=True, eq=False)
class LayerOrder:
    heads: torch.Tensor  # int64 [n_heads]: new head slot -> original head (stays inside its KV group)
    neurons: torch.Tensor  # int64 [ffn_dim]: new neuron slot -> original neuron


def layer_order(config: ModelConfig, head_scores: torch.Tensor, neuron_scores: torch.Tensor) -> LayerOrder:
    """Descending importance; ties keep the original order (stable), so reruns give the same permutation."""
    g = config.heads_per_group
    heads = torch.cat([torch.argsort(-head_scores[k * g:(k + 1) * g], stable=True) + k * g
                       for k in range(config.n_kv_heads)])
    return LayerOrder(heads, torch.argsort(-neuron_scores, stable=True))


def reorder_(config: ModelConfig, weights: ModelWeights, orders: dict[int, LayerOrder]) -> None:
    """Apply the orders to the given layers in place (tensor storage is reused: no pointer changes but down's
    re-quantised block copy)."""
    hd, f = config.head_dim, config.ffn_dim
    for i, order in orders.items():
        lw = weights.layers[i]
        q_rows = _expand(order.heads, hd)
        qkv_rows = torch.cat([q_rows, torch.arange(config.q_dim, config.q_dim + 2 * config.kv_dim)])
        _permute_rows_(lw.qkv, qkv_rows)
        _permute_cols_(lw.o, q_rows)
        _permute_rows_(lw.gate_up, torch.cat([order.neurons, order.neurons + f]))
        _permute_cols_(lw.down, order.neurons)


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit order -> element order for units `width` wide."""
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()


def _permute_rows_(lin: Linear, rows: torch.Tensor) -> None:
    lin.dense.copy_(lin.dense[rows])
    b = lin.blocks
    if b is not None:
        for t in (b.qs, b.scales) + ((b.mins,) if isinstance(b, Q4Blocks) else ()):
            t.copy_(t[rows])


def _permute_cols_(lin: Linear, cols: torch.Tensor) -> None:
    lin.dense.copy_(lin.dense[:, cols])
    b = lin.blocks
    if b is None:
        return
    starts = cols.view(-1, BLOCK)[:, 0] if cols.numel() % BLOCK == 0 else None
    whole_blocks = starts is not None and bool((starts % BLOCK == 0).all()) and torch.equal(
        cols, _expand(starts // BLOCK, BLOCK))
    if not whole_blocks:
        lin.blocks = quantize_q8(lin.dense)
        return
    block_order = starts // BLOCK
    per_block = b.qs.shape[1] // b.scales.shape[1]  # bytes (Q4: 16) or values (Q8: 32) of qs per block
    b.qs.copy_(b.qs[:, _expand(block_order, per_block)])
    for t in (b.scales,) + ((b.mins,) if isinstance(b, Q4Blocks) else ()):
        t.copy_(t[:, block_order])
