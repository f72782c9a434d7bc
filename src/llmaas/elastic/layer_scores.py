"""Per-layer scores on the calibration batch: leave-one-out loss (anchors, LayerReduction), block influence
(ShortGPT) and attention influence (AttnDrop).

Owns the three measurements and the anchor choice. Each is one or a few no-grad passes of the dense forward; layers
are "skipped" by giving them zero width, which is exactly returning the input. Ignores how the baselines use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmaas.elastic.dense_forward import DenseWeights, causal_lm_loss, hidden_states
from llmaas.model.transformer import Transformer
from llmaas.model.widths import LayerWidths, ModelWidths

ANCHOR_FRACTION = 0.2  # ElastiLM anchors 6 of 32 layers; llmaas takes the top 20% (6 of 30)


@dataclass(frozen=True)
class LayerScores:
    base_loss: float  # calibration loss of the whole model
    skip_loss: tuple[float, ...]  # loss with layer i skipped
    block_influence: tuple[float, ...]  # ShortGPT BI_i = 1 - cos(h_in, h_out), all hidden states flattened
    attention_influence: tuple[float, ...]  # 1 - cos(normed attention input, attention output), flattened

    def loo_order(self) -> list[int]:
        """Layers by importance, most important first: the largest loss increase when skipped."""
        return sorted(range(len(self.skip_loss)), key=lambda i: -self.skip_loss[i])

    def anchors(self) -> list[int]:
        count = max(1, round(ANCHOR_FRACTION * len(self.skip_loss))) if len(self.skip_loss) > 2 else 0
        return sorted(self.loo_order()[:count])


def skipped(model: Transformer, layers: set[int], *, attention: set[int] = frozenset(),
            ffn: set[int] = frozenset()) -> ModelWidths:
    """Full widths except: whole layers in `layers`, attention sub-layers in `attention`, FFN sub-layers in `ffn`."""
    c = model.config
    out = []
    for i in range(c.n_layers):
        heads = 0 if i in layers or i in attention else c.heads_per_group
        out.append(LayerWidths((heads,) * c.n_kv_heads, 0 if i in layers or i in ffn else c.ffn_dim))
    return ModelWidths(tuple(out))


@torch.no_grad()
def measure_layer_scores(model: Transformer, batch: torch.Tensor, progress=None) -> LayerScores:
    weights = DenseWeights.expanded(model.config, model.weights)
    n = model.config.n_layers
    bi, ai = [0.0] * n, [0.0] * n

    def tap(i: int, h_in: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, h_out: torch.Tensor) -> None:
        bi[i] = 1 - F.cosine_similarity(h_in.flatten(), h_out.flatten(), dim=0).item()
        ai[i] = 1 - F.cosine_similarity(x.flatten(), attn.flatten(), dim=0).item()

    hidden_states(model, weights, batch, tap=tap)
    base = causal_lm_loss(model, weights, batch).item()
    losses = []
    for i in range(n):
        losses.append(causal_lm_loss(model, weights, batch, widths=skipped(model, {i})).item())
        if progress is not None:
            progress(i + 1, n)
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError("a leave-one-out loss is not finite; the model or calibration batch is broken")
    return LayerScores(base, tuple(losses), tuple(bi), tuple(ai))
