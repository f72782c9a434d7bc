"""Per-context KV for the service: the seam the LLMS memory manager plugs into.

Owns which contexts have KV in memory and the byte budget over them. This first policy is deliberately simple (it is
LLMS's LMK baseline): a context's KV is one dense cache; when the budget is exceeded the least recently used idle
contexts are dropped whole, and a dropped or never-seen context (after a restart) is rebuilt by recomputing its
stored token ids. The chunked, compressed, swapped store of the memory issue replaces this class behind the same
four calls: acquire, release, drop, usage.
Ignores storage of text and ids (the catalogue) and what the KV is used for.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.transformer import Transformer

GROWTH_TOKENS = 256  # caches grow in steps of this many tokens, so a decode step rarely reallocates


@dataclass
class _Entry:
    cache: DenseKVCache
    ids: list[int]  # the token ids the cache covers, in order (len == cache.num_tokens)
    busy: bool = False
    last_used_s: float = 0.0


@dataclass(frozen=True)
class Residency:
    context_id: str
    resident_bytes: int
    cached_tokens: int
    busy: bool


class ContextKVStore:
    def __init__(self, model: Transformer, budget_bytes: int, prefill_chunk_tokens: int = 512,
                 dtype: torch.dtype = torch.float16) -> None:
        self.model = model
        self.spec = KVSpec.from_config(model.config)
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.recomputed_tokens = 0  # tokens rebuilt because their KV was not resident (switch work)

    def acquire(self, context_id: str, token_ids: Sequence[int], capacity_tokens: int) -> DenseKVCache:
        """KV covering exactly token_ids, made resident (reusing what is cached, recomputing the rest), with room for
        capacity_tokens in all; the context stays pinned until release()."""
        with self._lock:
            entry = self._entries.pop(context_id, None)
            if entry is not None:
                self._entries[context_id] = entry
                entry.busy = True
        if entry is None:
            entry = _Entry(DenseKVCache(self.spec, 0, self.dtype), [], busy=True)
            with self._lock:
                self._entries[context_id] = entry
        covered = common_prefix(entry.ids, token_ids)
        entry.cache.truncate(covered)
        del entry.ids[covered:]
        entry.cache.reserve(_rounded(capacity_tokens))
        missing = list(token_ids[covered:])
        for start in range(0, len(missing), self.prefill_chunk_tokens):
            chunk = torch.tensor(missing[start:start + self.prefill_chunk_tokens])
            n0 = entry.cache.num_tokens
            self.model.run_layers(self.model.embed(chunk), torch.arange(n0, n0 + chunk.numel()),
                                  entry.cache.append(chunk.numel()))
        self.recomputed_tokens += len(missing)
        entry.ids.extend(missing)
        return entry.cache

    def release(self, context_id: str, covered_ids: Sequence[int]) -> None:
        """End of a call: the cache now covers covered_ids; unpin it and evict idle contexts over the budget."""
        with self._lock:
            entry = self._entries.get(context_id)
            if entry is None:  # dropped (deleted) during the call
                return
            n = min(len(covered_ids), entry.cache.num_tokens)  # a failed recompute may have stopped short
            entry.cache.truncate(n)
            entry.ids = list(covered_ids[:n])
            entry.busy = False
            entry.last_used_s = time.time()
            self._evict_over_budget()

    def drop(self, context_id: str) -> None:
        with self._lock:
            self._entries.pop(context_id, None)

    def usage(self) -> list[Residency]:
        with self._lock:
            return [Residency(cid, e.cache.nbytes, e.cache.num_tokens, e.busy) for cid, e in self._entries.items()]

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.cache.nbytes for e in self._entries.values())

    def _evict_over_budget(self) -> None:
        total = sum(e.cache.nbytes for e in self._entries.values())
        for cid in [cid for cid, e in self._entries.items() if not e.busy]:
            if total <= self.budget_bytes:
                break
            total -= self._entries.pop(cid).cache.nbytes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _rounded(tokens: int) -> int:
    return -(-tokens // GROWTH_TOKENS) * GROWTH_TOKENS
