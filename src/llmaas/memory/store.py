"""The chunked context-KV store of LLMS: per-context chunks under one byte budget, a disk tier, and fast restore.

The façade the engine sees: acquire (the working KV covering a context's token ids, its chunks locked), release
(seal and write back what the call changed), drop, usage and the budget. It wires the parts: the budget ledger
(Claim, Reclaim, residency, dirty or clean, under the one lock: ledger.py), sealing (rechunk, staging, re-level,
write-back snapshot: sealing.py) and the restorer (plan, pipeline, adopt: restorer.py). The working KV is a dense
fp16 cache holding the decoded context (runtime memory outside the budget, reused by every call, like activations);
the budget counts what stays resident between calls: encoded chunks and the open chunk's staging copy. Also owns
which chunks still match a context's token ids, and the prefill of the tokens no chunk covers. Ignores text and
token ids (the catalogue) and generation (the engine).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmaas.errors import LlmaasError
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.memory.chunk import Chunk, ContextKV, prefix_hashes
from llmaas.memory.density_store import DensityStore
from llmaas.memory.ledger import BudgetLedger, MemoryBudgetError
from llmaas.memory.policy import MemoryPolicy
from llmaas.memory.restorer import Restorer, SwitchReport
from llmaas.memory.sealing import Sealer
from llmaas.memory.writer import WriteBack
from llmaas.model.transformer import DEFAULT_PREFILL_CHUNK_TOKENS, Transformer
from llmaas.restore.cost_model import RestoreProfile
from llmaas.storage.chunk_log import ChunkLog
from llmaas.storage.faults import DiskFaults
from llmaas.storage.throttle import DiskThrottle

__all__ = ["ChunkedKVStore", "MemoryBudgetError", "MemoryConfig", "Residency", "SwitchReport"]

GROWTH_TOKENS = 256  # the working KV grows in steps of this many tokens, so a decode step rarely reallocates


@dataclass(frozen=True)
class MemoryConfig:
    policy: MemoryPolicy
    budget_bytes: int
    kv_dir: Path
    model_id: str  # name + fingerprint: chunk files of another model are never used
    max_context_tokens: int = 2048
    throttle: DiskThrottle | None = None
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    faults: DiskFaults | None = None  # injected write/fsync errors (the reliability check's seam)


@dataclass(frozen=True)
class Residency:
    context_id: str
    resident_bytes: int
    cached_tokens: int
    busy: bool


class ChunkedKVStore:
    def __init__(self, model: Transformer, config: MemoryConfig, profile: RestoreProfile | None = None) -> None:
        self.model, self.config, self.policy = model, config, config.policy
        self.spec = KVSpec.from_config(model.config)
        self.geometry = ChunkGeometry(self.spec, self.policy.chunk_tokens)
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
                            throttle=config.throttle, faults=config.faults)
        self.densities = DensityStore(config.kv_dir / f"density-{self.policy.name}.sqlite3")
        self.writer = WriteBack()
        self.counters: Counter[str] = Counter()
        self.buffer = DenseKVCache(self.spec, 0)  # the working KV of the call in flight
        self.ledger = BudgetLedger(self.policy, config.budget_bytes, self.spec.n_layers, self.log, self.writer,
                                   self.counters)
        self.sealer = Sealer(self.ledger, self.buffer, self.geometry, self.policy, self.writer, self.counters)
        self.restorer = Restorer(self.ledger, self.sealer, model, self.buffer, self.log, self.geometry, self.policy,
                                 profile, self.counters)
        self._contexts = self.ledger.contexts  # the same dict, for benchmarks and tests that look inside
        self._hot: str | None = None  # the context whose decoded KV the working buffer holds
        self.last_switch: SwitchReport | None = None

    # -- the engine's seam ----------------------------------------------------------------------------------------

    def acquire(self, context_id: str, token_ids: Sequence[int], capacity_tokens: int) -> DenseKVCache:
        """The working KV covering exactly token_ids (restored or recomputed as needed), room for capacity_tokens,
        attention tracking on; the context's chunks stay locked until release()."""
        t0 = time.perf_counter()
        report = SwitchReport(context_id)
        with self.ledger.lock:
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
            self.restorer.load(ctx, missing, token_ids, report)
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
        with self.ledger.lock:
            ctx = self._contexts.get(context_id)
            if ctx is not None and ctx.dropped:  # deleted during the call: forget it now that it is unlocked
                self.ledger.forget(ctx)
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
        with self.ledger.lock:
            try:
                if self._hot == context_id:
                    self.sealer.rechunk(ctx, covered_ids[:n])
                    if self.policy.compress:
                        self.sealer.relevel(ctx)
                else:  # the working KV no longer holds this context (should not happen): keep what is stored
                    self.ledger.truncate(ctx, min(n, ctx.token_count))
            except BaseException:
                # Sealing failed midway (e.g. no room for a new chunk): keep none of this context's KV in memory
                # (its ids rebuild it) and unlock it, or its chunks would stay resident and unreclaimable for good.
                self.ledger.truncate(ctx, 0)
                self._hot = None
                ctx.locked = False
                raise
            for c in ctx.chunks:
                if c.is_resident:
                    self.ledger.queue.touch((ctx.id, c.index), c.level)
            ctx.locked = False
            dirty = [c for c in ctx.chunks if c.is_dirty]
            if self.policy.ahead_of_time and dirty:
                self.sealer.write_later(ctx, dirty)
            density = (ctx.prob_sum.copy(), ctx.row_count.copy())
        self.writer.submit(lambda: self.densities.save(context_id, *density))
        self.check_budget()

    def drop(self, context_id: str) -> None:
        """Forget a context entirely: memory, chunk files, index rows and densities (after pending writes)."""
        with self.ledger.lock:
            ctx = self._contexts.get(context_id)
            if ctx is not None and ctx.locked:  # in a call on the compute thread: release() forgets it
                ctx.dropped = True
            elif ctx is not None:
                self.ledger.forget(ctx)
            if self._hot == context_id and not (ctx is not None and ctx.locked):
                self._hot = None

        def forget() -> None:  # a def, not a lambda building a tuple: a write-back job returns None
            self.log.delete_context(context_id)
            self.densities.delete(context_id)

        self.writer.submit(forget)

    def context_ids(self) -> set[str]:
        """Contexts with KV in memory or chunks on disk."""
        with self.ledger.lock:
            ids = {c.id for c in self._contexts.values() if not c.dropped}
        return ids | set(self.log.context_ids())

    def usage(self) -> list[Residency]:
        with self.ledger.lock:
            return [Residency(c.id, c.resident_bytes, sum(k.fill for k in c.chunks if k.is_resident), c.locked)
                    for c in self._contexts.values() if not c.dropped]

    @property
    def resident_bytes(self) -> int:
        return self.ledger.resident_bytes

    @property
    def peak_resident_bytes(self) -> int:
        return self.ledger.peak_resident_bytes

    @property
    def recomputed_tokens(self) -> int:
        return self.counters["recomputed_tokens"]

    def reclaim(self, need_bytes: int) -> int:
        """Reclaim: evict unlocked chunks (policy order) until need_bytes are freed or none is left; bytes freed."""
        with self.ledger.lock:
            before = self.ledger.resident_bytes
            self.ledger.reclaim(need_bytes)
            return before - self.ledger.resident_bytes

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
        self.ledger.check()

    @staticmethod
    def minimum_budget_bytes(geometry: ChunkGeometry, policy: MemoryPolicy, max_context_tokens: int) -> int:
        """One maximum-length context at base precision plus its open chunk's staging copy (LLMS §6.3)."""
        chunks = -(-max_context_tokens // geometry.chunk_tokens)
        staging = 0 if policy.base_level == KVLevel.FP16 else staging_bytes(geometry.spec, geometry.chunk_tokens - 1)
        return chunks * geometry.payload_bytes(policy.base_level) + staging

    # -- which chunks match, and the tokens none covers ---------------------------------------------------------------

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
        """Keep the leading chunks built for exactly these tokens and forget the rest (their tokens get recomputed).
        Forgotten chunks were built for other tokens (the window slid, or a call was rolled back past them): their
        densities go too, and their disk copies are deleted once the writes queued before are done."""
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
        if keep == len(ctx.chunks):
            return
        kept_tokens = ctx.chunks[keep - 1].token_start + ctx.chunks[keep - 1].fill if keep else 0
        self.ledger.truncate(ctx, kept_tokens)
        ctx.prob_sum, ctx.row_count = ctx.prob_sum[:kept_tokens], ctx.row_count[:kept_tokens]
        context_id = ctx.id

        def delete_stale() -> None:  # a def: a write-back job returns None
            self.log.delete_chunks(context_id, keep)

        self.writer.submit(delete_stale)

    def _codec_id(self) -> str:
        return f"llmaas-kv/{self.policy.base_level.name.lower()}-c{self.policy.chunk_tokens}"


def staging_bytes(spec: KVSpec, tokens: int) -> int:
    """An open chunk's exact fp16 copy of `tokens` tokens (K and V, every layer and KV head)."""
    return spec.bytes_per_token("fp16") * tokens
