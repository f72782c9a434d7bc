"""The KV budget ledger of LLMS: which chunks are resident, the bytes they hold, Claim and Reclaim, dirty or clean.

Owns the store's one lock rule: every change to a resident payload, the victim queue, a context's chunk list or the
byte count happens under `lock`, and so does every walk over them. Reclaim evicts victims in the policy's order
(clean ones first: dropping them is free), skipping locked contexts; a dirty victim whose ahead-of-time write is
queued is waited for on `cleaned`, a condition of the lock that releases it however deeply it is held, so the
write-back thread can take it to mark chunks clean. Also owns `commit`, which writes chunk versions to the chunk
log and marks the current ones clean. Ignores how chunks are encoded (sealing.py) and restored (restorer.py).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch

from llmaas.errors import LlmaasError
from llmaas.memory.chunk import Chunk, ContextKV
from llmaas.memory.policy import MemoryPolicy
from llmaas.memory.victims import VictimQueue
from llmaas.memory.writer import WriteBack
from llmaas.storage.chunk_log import ChunkLog, ChunkRecord

log = logging.getLogger("llmaas.memory")

DIRTY_WAIT_POLL_S = 0.01  # how often a reclaim waiting for a dirty victim's write checks whether any write is left
Snapshot = list[tuple[Chunk, int, torch.Tensor]]  # chunks with the version and payload to write


class MemoryBudgetError(LlmaasError):
    """The KV budget cannot hold what one call needs (a configuration error: raise --kv-budget-mb)."""


class BudgetLedger:
    def __init__(self, policy: MemoryPolicy, budget_bytes: int, n_layers: int, log: ChunkLog, writer: WriteBack,
                 counters: Counter[str]) -> None:
        self.policy, self.budget_bytes, self.n_layers = policy, budget_bytes, n_layers
        self.log, self.writer, self.counters = log, writer, counters
        self.lock = threading.RLock()
        self.cleaned = threading.Condition(self.lock)
        self.contexts: dict[str, ContextKV] = {}
        self.queue = VictimQueue(policy.victim_order)
        self.resident_bytes = 0
        self.peak_resident_bytes = 0  # high-water mark of resident chunk bytes (benchmarks report it vs the budget)

    # -- residency (under the lock) ---------------------------------------------------------------------------------

    def set_resident(self, ctx: ContextKV, c: Chunk, payload: torch.Tensor, staging: torch.Tensor | None) -> None:
        self.evict_memory(ctx, c)
        c.payload, c.staging = payload, staging
        self.resident_bytes += c.resident_bytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if not ctx.locked:
            self.queue.touch((ctx.id, c.index), c.level)

    def evict_memory(self, ctx: ContextKV, c: Chunk) -> None:
        self.resident_bytes -= c.resident_bytes
        c.payload = c.staging = None
        self.queue.remove((ctx.id, c.index))

    def truncate(self, ctx: ContextKV, num_tokens: int) -> None:
        """Forget chunks past num_tokens (a partial overlap keeps nothing of that chunk)."""
        while ctx.chunks and ctx.chunks[-1].token_start + ctx.chunks[-1].fill > num_tokens:
            self.evict_memory(ctx, ctx.chunks.pop())

    def forget(self, ctx: ContextKV) -> None:
        """A context leaves memory entirely (its files are the store's business)."""
        del self.contexts[ctx.id]
        for c in ctx.chunks:
            self.evict_memory(ctx, c)

    def check(self) -> None:
        """The honest-budget invariant: resident chunk bytes never exceed the budget."""
        with self.lock:
            actual = sum(c.resident_bytes for c in self.contexts.values())
            assert actual == self.resident_bytes, (actual, self.resident_bytes)
            assert actual <= self.budget_bytes, f"{actual} resident bytes exceed the {self.budget_bytes}-byte budget"

    # -- Claim and Reclaim (under the lock) ---------------------------------------------------------------------------

    def claim(self, need_bytes: int) -> int:
        """Make room for need_bytes more resident bytes, reclaiming victims of unlocked contexts; returns how many
        dirty victims had to be waited for."""
        waited = 0
        over = self.resident_bytes + need_bytes - self.budget_bytes
        if over > 0:
            waited = self.reclaim(over)
        if self.resident_bytes + need_bytes > self.budget_bytes:
            raise MemoryBudgetError(
                f"the KV budget ({self.budget_bytes / 2**20:.1f} MiB) cannot fit this call's context; "
                "raise --kv-budget-mb or lower the context limit"
            )
        return waited

    def reclaim(self, need_bytes: int) -> int:
        """Evict victims in the policy's order until need_bytes are freed or none is left; returns how many dirty
        victims were waited for."""
        freed, waited = 0, 0
        for pass_dirty in (False, True):  # clean victims first: dropping them is free
            for key in list(self.queue.candidates()):
                if freed >= need_bytes:
                    return waited
                ctx = self.contexts.get(key[0])
                if ctx is None or ctx.locked or key[1] >= len(ctx.chunks):
                    continue
                chunk = ctx.chunks[key[1]]
                if not chunk.is_resident:
                    continue
                if self.policy.victim_order == "context":
                    freed += self._evict_context(ctx)
                elif pass_dirty or not chunk.is_dirty:  # the second pass takes any: a wait may have cleaned it
                    waited += int(chunk.is_dirty and self.policy.ahead_of_time)
                    freed += self._evict_chunk(ctx, chunk)
        return waited

    def _evict_chunk(self, ctx: ContextKV, chunk: Chunk) -> int:
        if chunk.is_dirty and self.policy.ahead_of_time:  # its write is queued: wait for it rather than write twice
            self.counters["waited_dirty"] += 1
            while chunk.is_dirty and self.writer.pending:
                self.cleaned.wait(DIRTY_WAIT_POLL_S)  # releases the lock meanwhile, whatever its depth
            if not chunk.is_resident or ctx.locked:  # dropped, or its context called, while the lock was free
                return 0
        if chunk.is_dirty:  # nothing in flight will write it (a failed write, or no ahead-of-time policy)
            try:
                self.commit(ctx, [(chunk, chunk.version, chunk.resident_payload)], "sync")
            except OSError:
                # A full, read-only or failing disk. KV is a cache of the context's token ids, which the catalogue
                # holds: drop the chunk unwritten and let the next restore recompute it, rather than fail the call.
                log.warning("chunk %d of context %s could not be written; evicted unwritten (recomputed when "
                            "needed)", chunk.index, ctx.id, exc_info=True)
                self.counters["unwritten_evictions"] += 1
        freed = chunk.resident_bytes
        self.evict_memory(ctx, chunk)
        self.counters["reclaimed_chunks"] += 1
        return freed

    def _evict_context(self, ctx: ContextKV) -> int:
        """Baselines LMK and Swapping: the whole context goes (killed, or written whole and dropped)."""
        resident = [c for c in ctx.chunks if c.is_resident]
        freed = sum(c.resident_bytes for c in resident)
        if not self.policy.writes_on_evict:
            for c in resident:
                self.evict_memory(ctx, c)
            ctx.chunks.clear()
            self.counters["contexts_killed"] += 1
            return freed
        write = resident if self.policy.whole_context_io else [c for c in resident if c.is_dirty]
        if write:
            try:
                self.commit(ctx, [(c, c.version, c.resident_payload) for c in write], "sync")
                self.counters["context_writes"] += 1
            except OSError:  # as in _evict_chunk: evicted unwritten, recomputed when needed
                log.warning("context %s could not be written; evicted unwritten", ctx.id, exc_info=True)
                self.counters["unwritten_evictions"] += len(write)
        for c in resident:
            self.evict_memory(ctx, c)
        self.counters["contexts_swapped_out"] += 1
        return freed

    # -- write-back ---------------------------------------------------------------------------------------------------

    def commit(self, ctx: ContextKV, snapshot: Snapshot, how: str) -> None:
        """Write chunk versions to the chunk log and mark the ones still current as clean (the write-back thread's
        job, or a reclaim's synchronous write)."""
        size, layers = self.policy.chunk_tokens, self.n_layers
        records = [ChunkRecord(c.index, version, int(c.level), c.token_start, c.token_start + size, c.fill,
                               c.prefix_hash, layers, payload.numel() // layers, payload)
                   for c, version, payload in snapshot]
        locations = self.log.write(ctx.id, records)
        with self.lock:
            for (c, version, payload), loc in zip(snapshot, locations, strict=True):
                if c.version == version:
                    c.committed_version, c.location = version, loc
                self.counters[f"{how}_written_bytes"] += payload.nbytes
            self.counters[f"{how}_written_chunks"] += len(snapshot)
            self.cleaned.notify_all()  # a reclaim may be waiting for one of these
