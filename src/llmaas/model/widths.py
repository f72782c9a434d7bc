"""Active widths of a sub-model: per layer, how many query heads of each KV group and how many FFN neurons run.

Owns the shape and validation of a width choice. Units are always prefixes (the first c query heads of a group, the
first f neurons), so a width is a zero-copy view of the weights once they are ordered by importance; ordering and
choosing widths belong to the elastic layer. Zero is allowed: a layer with no heads and no neurons is skipped, which
also expresses the layer- and attention-dropping baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmaas.errors import InvalidRequestError
from llmaas.model.config import ModelConfig


@dataclass(frozen=True)
class LayerWidths:
    q_heads: tuple[int, ...]  # per KV group: query heads kept, a prefix of that group's heads
    ffn: int  # FFN neurons kept, a prefix


@dataclass(frozen=True)
class ModelWidths:
    layers: tuple[LayerWidths, ...]

    @classmethod
    def full(cls, config: ModelConfig) -> ModelWidths:
        layer = LayerWidths((config.heads_per_group,) * config.n_kv_heads, config.ffn_dim)
        return cls((layer,) * config.n_layers)

    def check(self, config: ModelConfig) -> None:
        if len(self.layers) != config.n_layers:
            raise InvalidRequestError(f"widths name {len(self.layers)} layers; the model has {config.n_layers}")
        for i, w in enumerate(self.layers):
            if len(w.q_heads) != config.n_kv_heads or not all(
                    0 <= c <= config.heads_per_group for c in w.q_heads):
                raise InvalidRequestError(
                    f"layer {i}: q_heads {w.q_heads} must give 0..{config.heads_per_group} heads for each of "
                    f"{config.n_kv_heads} KV groups"
                )
            if not 0 <= w.ffn <= config.ffn_dim:
                raise InvalidRequestError(f"layer {i}: ffn width {w.ffn} must be in 0..{config.ffn_dim}")
