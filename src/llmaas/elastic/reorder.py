"""One-shot reordering: permute each elastic layer's units into descending importance, in place, once.

Owns the orders (query heads sorted within their KV group, FFN neurons sorted) and their application to the stored
weights (blocks, or dense where a matrix has no block format): q rows and o columns by whole heads, gate/up rows and
down columns by neuron (Linear.gather_rows_ and gather_columns_ say what stays exact: everything but decode through
down, whose neuron order splits blocks).
The model is functionally unchanged. Ignores which layers are elastic (the caller passes the orders).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmaas.model.config import ModelConfig
from llmaas.model.transformer import ModelWeights


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
        lw.qkv.gather_rows_(qkv_rows)
        lw.o.gather_columns_(q_rows)
        lw.gate_up.gather_rows_(torch.cat([order.neurons, order.neurons + f]))
        lw.down.gather_columns_(order.neurons)


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit order -> element order for units `width` wide."""
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()
