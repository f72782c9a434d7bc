"""DenseKVCache: one sequence's KV in contiguous per-layer tensors, slot == position; the caller-owned cache of
plain generation, tests and benchmarks.

Owns a growable store ([2, n_kv_heads, capacity, head_dim] per layer: keys then values; fp16 by default, like
llama.cpp)
and the KVView it hands the model for each pass. Ignores budgets, chunks and eviction (the memory manager's job).
"""

from __future__ import annotations

import torch

from llmaas.errors import ContextLengthError
from llmaas.kv.spec import KVSpec
from llmaas.model.stats import AttentionStats


class DenseKVCache:
    def __init__(self, spec: KVSpec, capacity_tokens: int, dtype: torch.dtype = torch.float16) -> None:
        shape = (2, spec.n_kv_heads, capacity_tokens, spec.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype) for _ in range(spec.n_layers)]
        self.capacity_tokens = capacity_tokens
        self.num_tokens = 0  # slots [0, num_tokens) hold keys
        self._positions = torch.arange(capacity_tokens)
        self.attention: AttentionStats | None = None  # per-slot attention received, when tracked (LLMS density)

    def track_attention(self) -> None:
        """Start (or restart) accumulating the attention every slot receives from the passes run on this cache."""
        self.attention = AttentionStats.zeros(self.capacity_tokens)

    def stats_view(self) -> AttentionStats | None:
        """The accumulator for the pass just appended (views over slots [0, num_tokens)), or None if untracked."""
        if self.attention is None:
            return None
        return AttentionStats(self.attention.prob_sum[:self.num_tokens], self.attention.row_count[:self.num_tokens])

    def reserve(self, capacity_tokens: int) -> None:
        """Grow to at least capacity_tokens slots, keeping what is cached (a copy: call it rarely)."""
        if capacity_tokens <= self.capacity_tokens:
            return
        for i, old in enumerate(self.kv):
            new = torch.zeros((*old.shape[:2], capacity_tokens, old.shape[3]), dtype=old.dtype)
            new[:, :, :self.num_tokens] = old[:, :, :self.num_tokens]
            self.kv[i] = new
        self.capacity_tokens = capacity_tokens
        self._positions = torch.arange(capacity_tokens)
        if self.attention is not None:
            grown = AttentionStats.zeros(capacity_tokens)
            grown.prob_sum[:self.num_tokens] = self.attention.prob_sum[:self.num_tokens]
            grown.row_count[:self.num_tokens] = self.attention.row_count[:self.num_tokens]
            self.attention = grown

    def truncate(self, num_tokens: int) -> None:
        """Forget slots [num_tokens, ...) (a rolled-back or rewritten tail); the next append overwrites them."""
        self.num_tokens = min(self.num_tokens, num_tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.kv)

    def append(self, num_new: int) -> _SlotView:
        """A view that writes the next num_new tokens at slots (= positions) num_tokens.. and extends the cache."""
        start = self.num_tokens
        if start + num_new > self.capacity_tokens:
            raise ContextLengthError(
                f"{start + num_new} tokens exceed this cache's capacity of {self.capacity_tokens}"
            )
        self.num_tokens = start + num_new
        return _SlotView(self, slice(start, start + num_new), self.num_tokens)

    def rewrite(self, slots: torch.Tensor) -> _SlotView:
        """A view that overwrites the given slots (any order, any gaps) and attends over all num_tokens slots:
        recompute of non-contiguous tokens at their true positions."""
        if slots.numel() and int(slots.max()) >= self.num_tokens:
            raise ContextLengthError(f"slot {int(slots.max())} is beyond the {self.num_tokens} tokens cached")
        return _SlotView(self, slots, self.num_tokens)


class _SlotView:
    def __init__(self, cache: DenseKVCache, slots: slice | torch.Tensor, length: int) -> None:
        self._cache = cache
        self._slots = slots
        self._length = length

    def key_positions(self) -> torch.Tensor:
        return self._cache._positions[:self._length]

    def slot_stores(self) -> tuple[list[torch.Tensor], int] | None:
        """(every layer's store, the first new slot) when the new tokens go to consecutive slots and the keys are
        slots [0, length) in order: what the native decode step writes and reads directly (Transformer.run_layers)."""
        return (self._cache.kv, self._slots.start) if isinstance(self._slots, slice) else None

    def update(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        store = self._cache.kv[layer]
        if isinstance(self._slots, slice):  # one strided copy for keys and values (the decode hot path)
            store[:, :, self._slots].copy_(kv)
        else:
            store[:, :, self._slots] = kv.to(store.dtype)
        return store[:, :, :self._length]
