"""Attention statistics of one forward pass: what each key received, for LLMS's chunk density.

Owns the accumulator layout only: per key slot of the KV view, the attention probability received (summed over
layers, query heads and query rows) and the number of (layer, head, row) triples that could see the key (not masked).
A token's density is prob_sum / row_count. Ignores tokens and chunks: the caller maps key slots to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class AttentionStats:
    prob_sum: torch.Tensor  # float32 [T]
    row_count: torch.Tensor  # float32 [T]

    @classmethod
    def zeros(cls, num_keys: int) -> AttentionStats:
        return cls(torch.zeros(num_keys), torch.zeros(num_keys))

    def density(self) -> torch.Tensor:
        """Mean attention probability each key received where visible; 0 for keys no query could see."""
        return torch.where(self.row_count > 0, self.prob_sum / self.row_count.clamp(min=1), 0.0)
