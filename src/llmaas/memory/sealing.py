"""Sealing a call's KV into chunks (LLMS §4): encode what the call created or extended, re-level, queue write-back.

Owns the end-of-call work on one context's chunks, from the working KV's exact values: new and extended chunks
encoded at the base level (the open chunk keeps an exact staging copy, so it is sealed from exact values rather than
from its INT8 copy), the level solve that moves low-density sealed chunks down (never up), decoding the changed
chunks back into the working KV (so a warm call and a restored one see the same values), and the ahead-of-time
write-back snapshot. Every method runs under the ledger's lock. Ignores how chunks are restored (restorer.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from llmaas.kv.chunking import cut_chunks
from llmaas.kv.codec import LEVEL_ERROR, ChunkGeometry, KVLevel, decode, decode_into, encode
from llmaas.kv.dense import DenseKVCache
from llmaas.memory.chunk import Chunk, ContextKV, prefix_hashes
from llmaas.memory.kv_levels import assign_levels
from llmaas.memory.ledger import BudgetLedger
from llmaas.memory.policy import MemoryPolicy
from llmaas.memory.writer import WriteBack


class Sealer:
    def __init__(self, ledger: BudgetLedger, buffer: DenseKVCache, geometry: ChunkGeometry, policy: MemoryPolicy,
                 writer: WriteBack, counters: Counter[str]) -> None:
        self.ledger, self.buffer, self.geometry, self.policy = ledger, buffer, geometry, policy
        self.writer, self.counters = writer, counters

    def rechunk(self, ctx: ContextKV, ids: Sequence[int]) -> None:
        """Encode the chunks this call created or extended (from the working KV's exact values)."""
        size = self.policy.chunk_tokens
        n = len(ids)
        self.ledger.truncate(ctx, min(n, ctx.token_count))
        first = ctx.token_count // size
        hashes = prefix_hashes(ids, size)
        changed = []
        for idx in range(first, -(-n // size)):
            start, fill = idx * size, min(size, n - idx * size)
            if idx < len(ctx.chunks):
                c = ctx.chunks[idx]
                if c.fill == fill:
                    continue
                self.ledger.evict_memory(ctx, c)
                c.fill, c.level, c.prefix_hash, c.version = fill, self.policy.base_level, hashes[idx], c.version + 1
            else:
                c = Chunk(idx, start, fill, self.policy.base_level, hashes[idx])
                ctx.chunks.append(c)
            changed.append(c)
        if not changed:
            return
        payloads = self.encode_from_buffer(changed, self.policy.base_level)
        staged = [self._staging_of(c) for c in changed]
        self.ledger.claim(sum(p.nbytes for p in payloads) + sum(0 if s is None else s.nbytes for s in staged))
        for c, payload, staging in zip(changed, payloads, staged, strict=True):
            self.ledger.set_resident(ctx, c, payload, staging)
        self.decode_back([c for c in changed if c.staging is None])

    def relevel(self, ctx: ContextKV) -> None:
        """Solve §4.4 over the sealed chunks and requantize those whose level drops (never rises)."""
        sealed = [c for c in ctx.chunks if c.fill == self.policy.chunk_tokens]
        if not sealed:
            return
        densities = ctx.chunk_densities()[:len(sealed)]
        targets = assign_levels(densities, [c.level for c in sealed], self.policy.ratio_global, self.policy.objective,
                                LEVEL_ERROR)
        moved = [(c, t) for c, t in zip(sealed, targets, strict=True) if t < c.level]
        n_layers = self.geometry.spec.n_layers
        for target in {t for _, t in moved}:
            group = [c for c, t in moved if t == target]
            for c in group:  # resident: a locked context's chunks are (acquire made them so; Reclaim skips them)
                k, v = decode(c.resident_payload.view(1, n_layers, -1), c.level, self.geometry)
                payload = encode(k, v, target, self.geometry)[0].reshape(-1)
                self.ledger.evict_memory(ctx, c)
                c.level, c.version = target, c.version + 1
                self.ledger.set_resident(ctx, c, payload, None)
            self.decode_back(group)
        self.counters["releveled_chunks"] += len(moved)

    def write_later(self, ctx: ContextKV, chunks: list[Chunk]) -> None:
        """Queue the write-back of dirty (so resident) chunks: the payloads are snapshotted now, under the lock."""
        snapshot = [(c, c.version, c.resident_payload) for c in chunks]
        self.writer.submit(lambda: self.ledger.commit(ctx, snapshot, "aot"))

    def encode_from_buffer(self, chunks: list[Chunk], level: KVLevel) -> list[torch.Tensor]:
        """The chunks' exact values from the working KV, encoded at `level` (one flat payload each)."""
        if not chunks:
            return []
        k, v = cut_chunks(self.buffer.kv, [(c.token_start, c.fill) for c in chunks], self.policy.chunk_tokens)
        payload = encode(k, v, level, self.geometry, fills=[c.fill for c in chunks])
        return [p.reshape(-1) for p in payload]

    def _staging_of(self, c: Chunk) -> torch.Tensor | None:
        """The open chunk's exact values, so it is sealed from them rather than from its INT8 copy."""
        if c.fill == self.policy.chunk_tokens or self.policy.base_level == KVLevel.FP16:
            return None
        span = slice(c.token_start, c.token_start + c.fill)
        return torch.stack([kv[:, :, span] for kv in self.buffer.kv], dim=1).clone()  # [2, L, Hkv, fill, D]

    def apply_staging(self, c: Chunk) -> None:
        """Put an open chunk's exact values back into the working KV (after a restore decoded its INT8 copy)."""
        staging = c.staging
        assert staging is not None  # its one caller checks
        span = slice(c.token_start, c.token_start + c.fill)
        for layer, kv in enumerate(self.buffer.kv):
            kv[:, :, span] = staging[:, layer]

    def decode_back(self, chunks: list[Chunk]) -> None:
        """Make the working KV equal what a later restore would decode, so a warm call and a restored one agree."""
        if chunks:
            decode_into([c.resident_payload for c in chunks], [c.level for c in chunks],  # all just made resident
                        [c.token_start for c in chunks], [c.fill for c in chunks], 0, self.geometry.spec.n_layers,
                        self.buffer.kv, self.geometry)
