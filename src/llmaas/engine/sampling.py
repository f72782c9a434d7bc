"""Sampling parameters (validated once, at the edge) and the sampler they make: logits [vocab] -> token id.

Owns greedy, temperature, top-k, top-p and seeding. Ignores everything before the logits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmaas.errors import InvalidRequestError

Sampler = Callable[[torch.Tensor], int]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # None = a fresh random seed per request

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or not (
                math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise InvalidRequestError(
                f"temperature must be a number in [0, 100] (0 = greedy); got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 = off); got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be a number in (0, 1]; got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be an integer in [0, 2^63); got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def make_sampler(params: SamplingParams) -> Sampler:
    if params.is_greedy:
        return lambda logits: int(torch.argmax(logits))
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))

    def sample(logits: torch.Tensor) -> int:
        scores = logits.double() / params.temperature
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
            scores = scores.index_put((order[drop],), torch.tensor(float("-inf"), dtype=scores.dtype))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))

    return sample
