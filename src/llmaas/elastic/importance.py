"""First-order Taylor importance of query heads and FFN neurons (LLM-Pruner's block-wise |w * dL/dw|), in fp32.

Owns one forward and backward pass of the causal-LM loss on the calibration batch and the per-unit sums:
a query head over its head_dim rows of Wq and its head_dim columns of Wo (K/V heads are never removed, so they are
not scored), a neuron over its gate row, up row and down column. Ignores which layers are elastic and the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmaas.elastic.dense_forward import DenseWeights, causal_lm_loss
from llmaas.model.transformer import Transformer


@dataclass(frozen=True, eq=False)
class Importance:
    heads: torch.Tensor  # fp32 [n_layers, n_heads], group-major head index
    neurons: torch.Tensor  # fp32 [n_layers, ffn_dim]


def taylor_importance(model: Transformer, batch: torch.Tensor) -> Importance:
    c = model.config
    weights = DenseWeights.expanded(c, model.weights).trainable_layers()
    loss = causal_lm_loss(model, weights, batch)
    loss.backward()
    heads, neurons = [], []
    with torch.no_grad():
        for lw in weights.layers:
            q = (lw.wq * lw.wq.grad).abs().view(c.n_heads, c.head_dim, c.d_model).sum(dim=(1, 2))
            o = (lw.wo * lw.wo.grad).abs().view(c.d_model, c.n_heads, c.head_dim).sum(dim=(0, 2))
            heads.append(q + o)
            neurons.append((lw.wg * lw.wg.grad).abs().sum(1) + (lw.wu * lw.wu.grad).abs().sum(1)
                           + (lw.wd * lw.wd.grad).abs().sum(0))
    return Importance(torch.stack(heads), torch.stack(neurons))
