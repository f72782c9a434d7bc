"""The model-side baselines of ElastiLM §10 as active widths of the unreordered-equivalent model: whole layers or
sub-layers set to zero width, which is exactly skipping them.

Owns each method's rule at a ratio r: LayerReduction keeps the floor(r*L) layers with the largest leave-one-out
loss; ShortGPT keeps the floor(r*L) layers with the largest block influence; AttnDrop drops attention and MLP
sub-layers (the artifact's search: attention drops outer, MLP drops inner, both from 0, first pair with
(attn_kept + 2 * mlp_kept) / 3L <= r, at most L - 1 of each dropped). LaCo (layer merging) is not built: it
needs a merged weight copy per ratio, which is not a width. Ignores measuring them (bench/eval_elastic.py).
"""

from __future__ import annotations

import math

from llmaas.elastic.layer_scores import LayerScores, skipped
from llmaas.model.transformer import Transformer
from llmaas.model.widths import ModelWidths

BASELINES = ("layer_reduction", "shortgpt", "attn_drop")


def _keep_top(scores: tuple[float, ...], keep: int) -> set[int]:
    """The layers NOT among the `keep` highest scores (the ones to drop)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[keep:])


def attn_drop_counts(n_layers: int, ratio: float) -> tuple[int, int]:
    """(attention sub-layers dropped, MLP sub-layers dropped) by the artifact's search, whose loops stop one short of
    dropping every sub-layer of a kind (it reports 15 and 31 dropped at r = 0.2 on 32 layers)."""
    for attn in range(n_layers):
        for mlp in range(n_layers):
            if (n_layers - attn) + 2 * (n_layers - mlp) <= ratio * 3 * n_layers + 1e-9:
                return attn, mlp
    return n_layers, n_layers


def baseline_widths(model: Transformer, scores: LayerScores, method: str, ratio: float) -> ModelWidths:
    n = model.config.n_layers
    keep = math.floor(ratio * n + 1e-9)
    if method == "layer_reduction":
        return skipped(model, _keep_top(scores.skip_loss, keep))
    if method == "shortgpt":
        return skipped(model, _keep_top(scores.block_influence, keep))
    if method == "attn_drop":
        attn, mlp = attn_drop_counts(n, ratio)
        return skipped(model, set(), attention=_keep_top(scores.attention_influence, n - attn),
                       ffn=_keep_top(scores.block_influence, n - mlp))
    raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
