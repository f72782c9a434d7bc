"""The nine model levels 0.2..1.0 and their widths: per non-anchor layer, the query heads kept per KV group and the
FFN neurons kept (anchors stay full). Levels are integer tenths so comparisons are exact.

Owns the keep-fraction table (ElastiLM's LLM-Pruner ratios), the rounding rules (heads ceil(n_heads * keep), neurons
ceil(ffn * keep) up to a multiple of 16) and the split of kept heads over groups by importance. Ignores how widths
are executed (model/transformer.py) and where the importance comes from.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from llmaas.errors import InvalidRequestError
from llmaas.model.config import ModelConfig
from llmaas.model.widths import LayerWidths, ModelWidths

MODEL_LEVELS = tuple(range(2, 11))  # model level m in tenths: 0.2 .. 1.0
KEEP = {2: Fraction(1, 10), 3: Fraction(1, 8), 4: Fraction(1, 4), 5: Fraction(3, 8), 6: Fraction(1, 2),
        7: Fraction(5, 8), 8: Fraction(3, 4), 9: Fraction(7, 8), 10: Fraction(1)}
FFN_MULTIPLE = 16  # neuron counts round up to this, so slices stay SIMD- and block-friendly


def model_level_name(level10: int) -> str:
    return f"{level10 / 10:.1f}"


def parse_model_level(text: str) -> int:
    """'0.4' or '4' (tenths) -> 4; anything else is refused with the valid choices."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    tenths = value * 10 if value <= 1 else value
    if not math.isfinite(tenths) or abs(tenths - round(tenths)) > 1e-9 or round(tenths) not in MODEL_LEVELS:
        choices = ", ".join(map(model_level_name, MODEL_LEVELS))
        raise InvalidRequestError(f"model level {text!r} is not one of {choices}")
    return round(tenths)


def kept_counts(config: ModelConfig, level10: int) -> tuple[int, int]:
    """(query heads, FFN neurons) kept in each non-anchor layer at a level."""
    keep = KEEP[level10]
    heads = math.ceil(config.n_heads * keep)
    ffn = math.ceil(math.ceil(config.ffn_dim * keep) / FFN_MULTIPLE) * FFN_MULTIPLE
    return heads, min(ffn, config.ffn_dim)


def level_widths(config: ModelConfig, head_importance: torch.Tensor, anchors: set[int], level10: int) -> ModelWidths:
    """Widths at a level, for weights already reordered (each group's heads in descending importance): the kept heads
    are the layer's k_h most important, which is a prefix of every group."""
    k_h, k_f = kept_counts(config, level10)
    full = LayerWidths((config.heads_per_group,) * config.n_kv_heads, config.ffn_dim)
    layers = []
    for i in range(config.n_layers):
        if i in anchors:
            layers.append(full)
            continue
        scores = head_importance[i].tolist()
        top = sorted(range(config.n_heads), key=lambda h: (-scores[h], h))[:k_h]
        per_group = [0] * config.n_kv_heads
        for h in top:
            per_group[h // config.heads_per_group] += 1
        layers.append(LayerWidths(tuple(per_group), k_f))
    return ModelWidths(tuple(layers))
