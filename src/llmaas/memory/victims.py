"""Victim order for Reclaim: the LCTRU queue of LLMS (§6.2) and the plain LRU orders of the baselines.

Owns the order in which resident chunks are offered for eviction: LCTRU keeps one LRU sub-queue per level and offers
the heaviest level first (Q_FP16 ‖ Q_8/8 ‖ Q_4/8 ‖ Q_2/8); "lru" is one queue over all chunks; "context" offers whole
contexts, least recently used first. Ignores locks and bytes: the store skips locked keys and stops when enough is
free. O(1) touch and remove (ordered dicts), so a call that touches 128 chunks costs microseconds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from llmaas.kv.codec import KVLevel
from llmaas.memory.policy import VictimOrder

ChunkKey = tuple[str, int]  # (context id, chunk index)


class VictimQueue:
    def __init__(self, order: VictimOrder) -> None:
        self.order = order
        self._queues: dict[int, OrderedDict[ChunkKey, None]] = {}  # sub-queue key -> LRU first
        self._level_of: dict[ChunkKey, int] = {}

    def _queue_key(self, level: KVLevel) -> int:
        return int(level) if self.order == "lctru" else 0

    def touch(self, key: ChunkKey, level: KVLevel) -> None:
        """The chunk is resident and was just used (or changed level): make it most recently used."""
        self.remove(key)
        q = self._queue_key(level)
        self._queues.setdefault(q, OrderedDict())[key] = None
        self._level_of[key] = q

    def remove(self, key: ChunkKey) -> None:
        q = self._level_of.pop(key, None)
        if q is not None:
            del self._queues[q][key]

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._level_of

    def __len__(self) -> int:
        return len(self._level_of)

    def candidates(self) -> Iterator[ChunkKey]:
        """Resident chunks in eviction order (a snapshot: the caller may evict while iterating). For "context",
        all chunks of the least recently used context come first, in chunk order."""
        if self.order == "context":
            yield from self._by_context()
            return
        for q in sorted(self._queues, reverse=True):  # heaviest level first (a single queue for "lru")
            yield from list(self._queues[q])

    def _by_context(self) -> Iterator[ChunkKey]:
        last_use: dict[str, int] = {}
        chunks: dict[str, list[ChunkKey]] = {}
        for rank, key in enumerate(k for q in self._queues.values() for k in q):
            last_use[key[0]] = rank  # the context's most recent touch decides its place
            chunks.setdefault(key[0], []).append(key)
        for ctx in sorted(last_use, key=last_use.__getitem__):
            yield from sorted(chunks[ctx], key=lambda k: k[1])
