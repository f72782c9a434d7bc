"""KVSpec: the shape of one token's KV and what it costs in bytes at each precision.

Owns the arithmetic every memory decision rests on (bytes per token, per chunk, per level), from the model config.
Ignores where KV lives. Payload bytes only: codec scales and zero-points are counted by the codecs that add them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmaas.model.config import ModelConfig

BITS_PER_VALUE = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class KVSpec:
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: ModelConfig) -> KVSpec:
        return cls(config.n_layers, config.n_kv_heads, config.head_dim)

    @property
    def values_per_token(self) -> int:
        """K and V, every layer and KV head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    def bytes_per_token(self, precision: str) -> int:
        return self.values_per_token * BITS_PER_VALUE[precision] // 8
