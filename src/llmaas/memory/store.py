"""The chunked context-KV store of LLMS: per-context chunks under one byte budget, a disk tier, and fast restore.

Owns the four primitives of LLMS §3 over every context's chunks: Claim (budget for new or restored chunks), Reclaim
(victims from the policy's queue, skipping the locked calling context; clean chunks first, dirty ones written or
waited for), Load (the planned IO-recompute pipeline into the engine's working KV) and Fault (a synchronous recompute,
counted; never expected). At the end of each call it seals and encodes the chunks the call changed, folds the call's
attention into the density sums, re-levels low-density chunks (down only) and queues the ahead-of-time write-back.
The engine sees the same four calls as before (acquire, release, drop, usage): acquire returns the working KV, a
dense fp16 cache holding the decoded context (runtime memory outside the budget, reused by every call, like
activations); the budget counts what stays resident between calls: encoded chunks and the open chunk's staging copy.
Ignores text and token ids (the catalogue) and generation (the engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmaas.errors import LlmaasError
from llmaas.kv.chunking import cut_chunks
from llmaas.kv.codec import LEVEL_ERROR, ChunkGeometry, KVLevel, decode, decode_into, encode
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.memory.chunk import Chunk, ContextKV, prefix_hashes
from llmaas.memory.density_store import DensityStore
from llmaas.memory.kv_levels import assign_levels
from llmaas.memory.policy import MemoryPolicy
from llmaas.memory.victims import VictimQueue
from llmaas.memory.writer import WriteBack
from llmaas.model.transformer import Transformer
from llmaas.restore.cost_model import RestoreProfile
from llmaas.restore.pipeline import LoadItem, RestoreOutcome, Span, restore
from llmaas.restore.planner import MissingChunk, RestorePlan, plan_for_mode
from llmaas.storage.chunk_log import ChunkLog, ChunkRecord
from llmaas.storage.throttle import DiskThrottle

log = logging.getLogger("llmaas.memory")

GROWTH_TOKENS = 256  # the working KV grows in steps of this many tokens, so a decode step rarely reallocates
DIRTY_WAIT_POLL_S = 0.01  # how often a reclaim waiting for a dirty victim's write checks whether any write is left


class MemoryBudgetError(LlmaasError):
    """The KV budget cannot hold what one call needs (a configuration error: raise --kv-budget-mb)."""


@dataclass(frozen=True)
class MemoryConfig:
    policy: MemoryPolicy
    budget_bytes: int
    kv_dir: Path
    model_id: str  # name + fingerprint: chunk files of another model are never used
    max_context_tokens: int = 2048
    throttle: DiskThrottle | None = None
    prefill_chunk_tokens: int = 512


@dataclass(frozen=True)
class Residency:
    context_id: str
    resident_bytes: int
    cached_tokens: int
    busy: bool


@dataclass
class SwitchReport:
    """What making one context resident cost (LLMS §1.3: arrival until its KV is resident; prefill excluded)."""
    context_id: str
    switch_s: float = 0.0
    reclaim_s: float = 0.0
    restore_s: float = 0.0
    bytes_read: int = 0
    loaded_chunks: int = 0
    recomputed_chunks: int = 0
    recomputed_tokens: int = 0
    predicted_s: float = 0.0
    waited_dirty: int = 0
    # Prefill of the tokens no KV ever held (the previous reply's last token and the turn's closing tokens): new
    # input like the prompt, so not part of the switch (spec §1.3), but done here because the ids demand it.
    tail_s: float = 0.0
    hot: bool = False  # the working KV already held this context
    timeline: list[Span] = field(default_factory=list)


class ChunkedKVStore:
    def __init__(self, model: Transformer, config: MemoryConfig, profile: RestoreProfile | None = None) -> None:
        self.model, self.config, self.policy = model, config, config.policy
        self.spec = KVSpec.from_config(model.config)
        self.geometry = ChunkGeometry(self.spec, self.policy.chunk_tokens)
        self.profile = profile
        if self.policy.restore == "pipeline" and profile is None:
            raise LlmaasError("the pipelined restore needs a restore profile; run `llmaas profile`")
        self.budget_bytes = config.budget_bytes
        floor = self.minimum_budget_bytes(self.geometry, self.policy, config.max_context_tokens)
        if config.budget_bytes < floor:
            raise MemoryBudgetError(
                f"a KV budget of {config.budget_bytes / 2**20:.1f} MiB cannot hold one {config.max_context_tokens}-"
                f"token context ({floor / 2**20:.1f} MiB at {self.policy.base_level.name}); raise --kv-budget-mb"
            )
        config.kv_dir.mkdir(parents=True, exist_ok=True)
        self.log = ChunkLog(config.kv_dir / self.policy.name, config.model_id, self._codec_id(),
                            throttle=config.throttle)
        self.densities = DensityStore(config.kv_dir / f"density-{self.policy.name}.sqlite3")
        self.writer = WriteBack()
        self.queue = VictimQueue(self.policy.victim_order)
        self.buffer = DenseKVCache(self.spec, 0)  # the working KV of the call in flight
        self._hot: str | None = None  # the context whose decoded KV the working buffer holds
        self._contexts: dict[str, ContextKV] = {}
        # One lock over the budget, the victim queue and every context's chunk list (the lock rule: whatever changes
        # or walks them holds it). Reclaim waiting for a dirty victim waits on `_cleaned`, which releases the lock
        # however deeply it is held, so the write-back thread can take it to mark chunks clean.
        self._lock = threading.RLock()
        self._cleaned = threading.Condition(self._lock)
        self._resident_bytes = 0
        self.peak_resident_bytes = 0  # high-water mark of resident chunk bytes (benchmarks report it vs the budget)
        self.counters: Counter[str] = Counter()
        self.last_switch: SwitchReport | None = None

    # -- the engine's seam ----------------------------------------------------------------------------------------

    def acquire(self, context_id: str, token_ids: Sequence[int], capacity_tokens: int) -> DenseKVCache:
        """The working KV covering exactly token_ids (restored or recomputed as needed), room for capacity_tokens,
        attention tracking on; the context's chunks stay locked until release()."""
        t0 = time.perf_counter()
        report = SwitchReport(context_id)
        with self._lock:
            ctx = self._contexts.get(context_id) or self._open(context_id)
            ctx.locked = True
            self._validate(ctx, token_ids)
        buf = self.buffer
        buf.reserve(-(-capacity_tokens // GROWTH_TOKENS) * GROWTH_TOKENS)
        missing = [c for c in ctx.chunks if not c.is_resident]
        if self._hot == context_id and not missing:
            report.hot = True
        else:
            self._hot = None
            buf.num_tokens = ctx.token_count
            self._load(ctx, missing, token_ids, report)
        buf.num_tokens = ctx.token_count
        buf.track_attention()
        self._prefill_tail(ctx, token_ids, report)
        self.counters["recomputed_tokens"] += report.recomputed_tokens
        self._hot = context_id
        report.switch_s = time.perf_counter() - t0 - report.tail_s
        self.counters["switches"] += 1
        self.last_switch = report
        return buf

    def release(self, context_id: str, covered_ids: Sequence[int]) -> None:
        """End of a call: the working KV covers covered_ids. Seal and encode what changed, fold in the call's
        attention, re-level, unlock, and queue the write-back."""
        with self._lock:
            ctx = self._contexts.get(context_id)
            if ctx is not None and ctx.dropped:  # deleted during the call: forget it now that it is unlocked
                self._forget_memory(ctx)
                ctx = None
        if ctx is None:
            self._hot = None
            return
        buf = self.buffer
        n = min(len(covered_ids), buf.num_tokens)
        att = buf.attention
        if att is not None and self._hot == context_id:
            ctx.add_attention(att.prob_sum[:n].double().numpy(), att.row_count[:n].double().numpy())
        else:
            ctx.add_attention(np.zeros(n), np.zeros(n))
        buf.attention = None
        with self._lock:
            if self._hot == context_id:
                self._rechunk(ctx, covered_ids[:n])
                if self.policy.compress:
                    self._relevel(ctx)
            else:  # the working KV no longer holds this context (should not happen): keep what is stored
                self._truncate(ctx, min(n, ctx.token_count))
            for c in ctx.chunks:
                if c.is_resident:
                    self.queue.touch((ctx.id, c.index), c.level)
            ctx.locked = False
            dirty = [c for c in ctx.chunks if c.is_dirty]
            if self.policy.ahead_of_time and dirty:
                self._write_later(ctx, dirty)  # under the lock: a drop cannot take the payloads mid-snapshot
            density = (ctx.prob_sum.copy(), ctx.row_count.copy())
        self.writer.submit(lambda: self.densities.save(context_id, *density))
        self.check_budget()

    def drop(self, context_id: str) -> None:
        """Forget a context entirely: memory, chunk files, index rows and densities (after pending writes)."""
        with self._lock:
            ctx = self._contexts.get(context_id)
            if ctx is not None and ctx.locked:  # in a call on the compute thread: release() forgets it
                ctx.dropped = True
            elif ctx is not None:
                self._forget_memory(ctx)
            if self._hot == context_id and not (ctx is not None and ctx.locked):
                self._hot = None

        def forget() -> None:  # a def, not a lambda building a tuple: a write-back job returns None
            self.log.delete_context(context_id)
            self.densities.delete(context_id)

        self.writer.submit(forget)

    def _forget_memory(self, ctx: ContextKV) -> None:
        del self._contexts[ctx.id]
        for c in ctx.chunks:
            self._evict_memory(ctx, c)

    def context_ids(self) -> set[str]:
        """Contexts with KV in memory or chunks on disk."""
        with self._lock:
            ids = {c.id for c in self._contexts.values() if not c.dropped}
        return ids | set(self.log.context_ids())

    def usage(self) -> list[Residency]:
        with self._lock:
            return [Residency(c.id, c.resident_bytes, sum(k.fill for k in c.chunks if k.is_resident), c.locked)
                    for c in self._contexts.values() if not c.dropped]

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    @property
    def recomputed_tokens(self) -> int:
        return self.counters["recomputed_tokens"]

    def reclaim(self, need_bytes: int) -> int:
        """Reclaim: evict unlocked chunks (policy order) until need_bytes are freed or none is left; bytes freed."""
        with self._lock:
            before = self._resident_bytes
            self._reclaim(need_bytes, None)
            return before - self._resident_bytes

    def recover(self, live_context_ids: set[str]) -> None:
        """At startup: drop chunk files, rows and densities of contexts that no longer exist, and leftovers."""
        self.log.recover(live_context_ids)
        self.densities.retain(live_context_ids)

    def close(self) -> None:
        self.writer.close()
        self.densities.close()
        self.log.close()

    def check_budget(self) -> None:
        """The honest-budget invariant: resident chunk bytes never exceed the budget."""
        with self._lock:
            actual = sum(c.resident_bytes for c in self._contexts.values())
            assert actual == self._resident_bytes, (actual, self._resident_bytes)
            assert actual <= self.budget_bytes, f"{actual} resident bytes exceed the {self.budget_bytes}-byte budget"

    @staticmethod
    def minimum_budget_bytes(geometry: ChunkGeometry, policy: MemoryPolicy, max_context_tokens: int) -> int:
        """One maximum-length context at base precision plus its open chunk's staging copy (LLMS §6.3)."""
        chunks = -(-max_context_tokens // geometry.chunk_tokens)
        staging = 0 if policy.base_level == KVLevel.FP16 else staging_bytes(geometry.spec, geometry.chunk_tokens - 1)
        return chunks * geometry.payload_bytes(policy.base_level) + staging

    # -- Load -------------------------------------------------------------------------------------------------------

    def _load(self, ctx: ContextKV, missing: list[Chunk], token_ids: Sequence[int], report: SwitchReport) -> None:
        buf = self.buffer
        t0 = time.perf_counter()
        with self._lock:
            self._claim(sum(self.geometry.payload_bytes(c.level) for c in missing), report)
        report.reclaim_s = time.perf_counter() - t0
        resident = [c for c in ctx.chunks if c.is_resident]  # a locked context's chunks: reclaim skips them
        if resident:  # decode what is in memory (everything, on the common path of a warm context)
            decode_into([c.resident_payload for c in resident], [c.level for c in resident],
                        [c.token_start for c in resident], [c.fill for c in resident], 0, self.spec.n_layers, buf.kv,
                        self.geometry)
        plan = self._plan(missing)
        by_index = {c.index: c for c in missing}
        # The plan loads only chunks that are on disk (the others are must_recompute): each has a location.
        loads = [LoadItem(i, by_index[i].disk_location, by_index[i].level, by_index[i].token_start, by_index[i].fill)
                 for i in plan.load]
        spans = [(by_index[i].token_start, by_index[i].fill) for i in plan.recompute]
        outcome = restore(self.model, buf, self.log, self.geometry, loads, spans, token_ids,
                          self.policy.layers_per_step)
        with self._lock:
            self._adopt(ctx, by_index, plan, outcome)
        if ctx.chunks and ctx.chunks[-1].staging is not None:  # the open chunk's exact values (only if it stayed)
            self._apply_staging(ctx.chunks[-1])
        report.restore_s = outcome.elapsed_s
        report.bytes_read = outcome.bytes_read
        report.loaded_chunks = len(plan.load) - len(outcome.failed)
        report.recomputed_chunks = len(plan.recompute) + len(outcome.failed)
        report.recomputed_tokens = outcome.recomputed_tokens
        report.predicted_s = plan.predicted_s
        report.timeline = outcome.timeline
        if any(not c.is_resident for c in ctx.chunks):  # never expected: the working set was just made resident
            self._fault(ctx, token_ids)
        self.counters["bytes_read"] += outcome.bytes_read
        self.counters["loaded_chunks"] += report.loaded_chunks
        self.counters["recomputed_chunks"] += report.recomputed_chunks
        if missing and self.policy.whole_context_io:
            self.counters["context_reads"] += 1

    def _prefill_tail(self, ctx: ContextKV, token_ids: Sequence[int], report: SwitchReport) -> None:
        """Compute the tokens no chunk covers. Those this context already queried once (their KV was dropped) are
        re-processing and leave the density sums alone; never-queried ones (the last token of the previous reply)
        are new queries and count (LLMS §4.2)."""
        buf, step = self.buffer, self.config.prefill_chunk_tokens
        queried = len(ctx.prob_sum)
        while buf.num_tokens < len(token_ids):
            n0 = buf.num_tokens
            is_new = n0 >= queried
            stop = min(len(token_ids), n0 + step, len(token_ids) if is_new else queried)
            t0 = time.perf_counter()
            ids = torch.tensor(list(token_ids[n0:stop]))
            view = buf.append(ids.numel())
            self.model.run_layers(self.model.embed(ids), torch.arange(n0, stop), view,
                                  stats=buf.stats_view() if is_new else None)
            if is_new:
                report.tail_s += time.perf_counter() - t0
            else:
                report.recomputed_tokens += ids.numel()

    def _plan(self, missing: list[Chunk]) -> RestorePlan:
        chunks = [MissingChunk(c.index, c.level, self.geometry.payload_bytes(c.level), not c.is_on_disk)
                  for c in missing]
        return plan_for_mode(chunks, self.profile, self.policy.restore)

    def _adopt(self, ctx: ContextKV, by_index: dict[int, Chunk], plan: RestorePlan, outcome: RestoreOutcome) -> None:
        """Install what the restore produced: loaded bytes as clean chunks, recomputed KV encoded at its level."""
        for i, payload in outcome.payloads.items():
            self._set_resident(ctx, by_index[i], payload, None)
            by_index[i].location = outcome.locations[i]  # a compaction may have moved it: saves a lookup next time
        for i, why in zip(outcome.failed, outcome.failures, strict=True):
            log.warning("chunk %d of context %s was unreadable (%s); rebuilt by recompute", i, ctx.id, why)
            self.counters["corrupt_chunks"] += 1
            by_index[i].committed_version = None  # the disk copy is bad: the write-back replaces it
        rebuilt = [by_index[i] for i in (*plan.recompute, *outcome.failed)]
        for level in {c.level for c in rebuilt}:
            group = [c for c in rebuilt if c.level == level]
            for c, payload in zip(group, self._encode_from_buffer(group, level), strict=True):
                self._set_resident(ctx, c, payload, None)
            self._decode_back(group)

    def _fault(self, ctx: ContextKV, token_ids: Sequence[int]) -> None:
        """Fault: bring a missing chunk in during a call, synchronously, by recompute (counted; LLMS never needs it)."""
        missing = [c for c in ctx.chunks if not c.is_resident]
        self.counters["faults"] += len(missing)
        with self._lock:
            self._claim(sum(self.geometry.payload_bytes(c.level) for c in missing), None)
        restore(self.model, self.buffer, self.log, self.geometry, (), [(c.token_start, c.fill) for c in missing],
                token_ids)
        with self._lock:
            for c in missing:
                self._set_resident(ctx, c, self._encode_from_buffer([c], c.level)[0], None)

    # -- end of call: chunking, levels, write-back -----------------------------------------------------------------

    def _rechunk(self, ctx: ContextKV, ids: Sequence[int]) -> None:
        """Encode the chunks this call created or extended (from the working KV's exact values)."""
        size = self.policy.chunk_tokens
        n = len(ids)
        self._truncate(ctx, min(n, ctx.token_count))
        first = ctx.token_count // size
        hashes = prefix_hashes(ids, size)
        changed = []
        for idx in range(first, -(-n // size)):
            start, fill = idx * size, min(size, n - idx * size)
            if idx < len(ctx.chunks):
                c = ctx.chunks[idx]
                if c.fill == fill:
                    continue
                self._evict_memory(ctx, c)
                c.fill, c.level, c.prefix_hash, c.version = fill, self.policy.base_level, hashes[idx], c.version + 1
            else:
                c = Chunk(idx, start, fill, self.policy.base_level, hashes[idx])
                ctx.chunks.append(c)
            changed.append(c)
        if not changed:
            return
        payloads = self._encode_from_buffer(changed, self.policy.base_level)
        staged = [self._staging_of(c) for c in changed]
        self._claim(sum(p.nbytes for p in payloads) + sum(0 if s is None else s.nbytes for s in staged), None)
        for c, payload, staging in zip(changed, payloads, staged, strict=True):
            self._set_resident(ctx, c, payload, staging)
        self._decode_back([c for c in changed if c.staging is None])

    def _relevel(self, ctx: ContextKV) -> None:
        """Solve §4.4 over the sealed chunks and requantize those whose level drops (never rises)."""
        sealed = [c for c in ctx.chunks if c.fill == self.policy.chunk_tokens]
        if not sealed:
            return
        densities = ctx.chunk_densities()[:len(sealed)]
        targets = assign_levels(densities, [c.level for c in sealed], self.policy.ratio_global, self.policy.objective,
                                LEVEL_ERROR)
        moved = [(c, t) for c, t in zip(sealed, targets, strict=True) if t < c.level]
        for target in {t for _, t in moved}:
            group = [c for c, t in moved if t == target]
            for c in group:  # resident: a locked context's chunks are (acquire made them so; Reclaim skips them)
                k, v = decode(c.resident_payload.view(1, self.spec.n_layers, -1), c.level, self.geometry)
                payload = encode(k, v, target, self.geometry)[0].reshape(-1)
                self._evict_memory(ctx, c)
                c.level, c.version = target, c.version + 1
                self._set_resident(ctx, c, payload, None)
            self._decode_back(group)
        self.counters["releveled_chunks"] += len(moved)

    def _write_later(self, ctx: ContextKV, chunks: list[Chunk]) -> None:
        """Queue the write-back of dirty (so resident) chunks; called under the lock."""
        snapshot = [(c, c.version, c.resident_payload) for c in chunks]
        self.writer.submit(lambda: self._commit(ctx, snapshot, "aot"))

    def _commit(self, ctx: ContextKV, snapshot: list[tuple[Chunk, int, torch.Tensor]], how: str) -> None:
        """Write chunk versions to the chunk log and mark the ones still current as clean."""
        size, layers = self.policy.chunk_tokens, self.spec.n_layers
        records = [ChunkRecord(c.index, version, int(c.level), c.token_start, c.token_start + size, c.fill,
                               c.prefix_hash, layers, payload.numel() // layers, payload)
                   for c, version, payload in snapshot]
        locations = self.log.write(ctx.id, records)
        with self._lock:
            for (c, version, payload), loc in zip(snapshot, locations, strict=True):
                if c.version == version:
                    c.committed_version, c.location = version, loc
                self.counters[f"{how}_written_bytes"] += payload.nbytes
            self.counters[f"{how}_written_chunks"] += len(snapshot)
            self._cleaned.notify_all()  # a reclaim may be waiting for one of these

    # -- Claim and Reclaim -----------------------------------------------------------------------------------------

    def _claim(self, need_bytes: int, report: SwitchReport | None) -> None:
        """Make room for need_bytes more resident bytes, reclaiming victims of other contexts (under the lock)."""
        over = self._resident_bytes + need_bytes - self.budget_bytes
        if over > 0:
            self._reclaim(over, report)
        if self._resident_bytes + need_bytes > self.budget_bytes:
            raise MemoryBudgetError(
                f"the KV budget ({self.budget_bytes / 2**20:.1f} MiB) cannot fit this call's context; "
                "raise --kv-budget-mb or lower the context limit"
            )

    def _reclaim(self, need_bytes: int, report: SwitchReport | None) -> None:
        freed = 0
        for pass_dirty in (False, True):  # clean victims first: dropping them is free
            for key in list(self.queue.candidates()):
                if freed >= need_bytes:
                    return
                ctx = self._contexts.get(key[0])
                if ctx is None or ctx.locked or key[1] >= len(ctx.chunks):
                    continue
                chunk = ctx.chunks[key[1]]
                if not chunk.is_resident:
                    continue
                if self.policy.victim_order == "context":
                    freed += self._evict_context(ctx, report)
                elif pass_dirty or not chunk.is_dirty:  # the second pass takes any: a wait may have cleaned it
                    freed += self._evict_chunk(ctx, chunk, report)

    def _evict_chunk(self, ctx: ContextKV, chunk: Chunk, report: SwitchReport | None) -> int:
        if chunk.is_dirty and self.policy.ahead_of_time:  # its write is queued: wait for it rather than write twice
            self.counters["waited_dirty"] += 1
            if report is not None:
                report.waited_dirty += 1
            while chunk.is_dirty and self.writer.pending:
                self._cleaned.wait(DIRTY_WAIT_POLL_S)  # releases the lock meanwhile, whatever its depth
            if not chunk.is_resident or ctx.locked:  # dropped, or its context called, while the lock was free
                return 0
        if chunk.is_dirty:  # nothing in flight will write it (a failed write, or no ahead-of-time policy)
            self._commit(ctx, [(chunk, chunk.version, chunk.resident_payload)], "sync")
        freed = chunk.resident_bytes
        self._evict_memory(ctx, chunk)
        self.counters["reclaimed_chunks"] += 1
        return freed

    def _evict_context(self, ctx: ContextKV, report: SwitchReport | None) -> int:
        """Baselines LMK and Swapping: the whole context goes (killed, or written whole and dropped)."""
        resident = [c for c in ctx.chunks if c.is_resident]
        freed = sum(c.resident_bytes for c in resident)
        if not self.policy.writes_on_evict:
            for c in resident:
                self._evict_memory(ctx, c)
            ctx.chunks.clear()
            self.counters["contexts_killed"] += 1
            return freed
        write = resident if self.policy.whole_context_io else [c for c in resident if c.is_dirty]
        if write:
            self._commit(ctx, [(c, c.version, c.resident_payload) for c in write], "sync")
            self.counters["context_writes"] += 1
        for c in resident:
            self._evict_memory(ctx, c)
        self.counters["contexts_swapped_out"] += 1
        return freed

    # -- helpers ----------------------------------------------------------------------------------------------------

    def _open(self, context_id: str) -> ContextKV:
        """A context this process has not seen yet: its committed chunks on disk, none resident."""
        ctx = ContextKV(context_id)
        locations = self.log.locations(context_id)
        for index in range(len(locations)):
            loc = locations.get(index)
            if loc is None:
                break
            ctx.chunks.append(Chunk(index, loc.token_start, loc.fill, KVLevel(loc.level), loc.prefix_hash,
                                    version=loc.version, committed_version=loc.version, location=loc))
        ctx.prob_sum, ctx.row_count = self.densities.load(context_id)
        self._contexts[context_id] = ctx
        return ctx

    def _validate(self, ctx: ContextKV, token_ids: Sequence[int]) -> None:
        """Keep the leading chunks built for exactly these tokens; forget the rest (their tokens get recomputed)."""
        size = self.policy.chunk_tokens
        hashes = prefix_hashes(token_ids, size)
        keep = 0
        for c in ctx.chunks:
            end = c.token_start + c.fill
            if end > len(token_ids) or c.token_start != c.index * size:
                break
            expected = hashes[c.index] if c.fill == size else prefix_hashes(token_ids[:end], size)[-1]
            if expected != c.prefix_hash:
                break
            keep += 1
        self._truncate(ctx, ctx.chunks[keep - 1].token_start + ctx.chunks[keep - 1].fill if keep else 0)

    def _truncate(self, ctx: ContextKV, num_tokens: int) -> None:
        """Forget chunks past num_tokens (a partial overlap keeps nothing of that chunk)."""
        while ctx.chunks and ctx.chunks[-1].token_start + ctx.chunks[-1].fill > num_tokens:
            self._evict_memory(ctx, ctx.chunks.pop())

    def _set_resident(self, ctx: ContextKV, c: Chunk, payload: torch.Tensor, staging: torch.Tensor | None) -> None:
        self._evict_memory(ctx, c)
        c.payload, c.staging = payload, staging
        self._resident_bytes += c.resident_bytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._resident_bytes)
        if not ctx.locked:
            self.queue.touch((ctx.id, c.index), c.level)

    def _evict_memory(self, ctx: ContextKV, c: Chunk) -> None:
        self._resident_bytes -= c.resident_bytes
        c.payload = c.staging = None
        self.queue.remove((ctx.id, c.index))

    def _encode_from_buffer(self, chunks: list[Chunk], level: KVLevel) -> list[torch.Tensor]:
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

    def _apply_staging(self, c: Chunk) -> None:
        staging = c.staging
        assert staging is not None  # its one caller checks
        span = slice(c.token_start, c.token_start + c.fill)
        for layer, kv in enumerate(self.buffer.kv):
            kv[:, :, span] = staging[:, layer]

    def _decode_back(self, chunks: list[Chunk]) -> None:
        """Make the working KV equal what a later restore would decode, so a warm call and a restored one agree."""
        if chunks:
            decode_into([c.resident_payload for c in chunks], [c.level for c in chunks],  # all just made resident
                        [c.token_start for c in chunks], [c.fill for c in chunks], 0, self.spec.n_layers,
                        self.buffer.kv, self.geometry)

    def _codec_id(self) -> str:
        return f"llmaas-kv/{self.policy.base_level.name.lower()}-c{self.policy.chunk_tokens}"


def staging_bytes(spec: KVSpec, tokens: int) -> int:
    """An open chunk's exact fp16 copy of `tokens` tokens (K and V, every layer and KV head)."""
    return spec.bytes_per_token("fp16") * tokens
