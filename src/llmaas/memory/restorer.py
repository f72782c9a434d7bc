"""Making a context's missing chunks resident again (LLMS §5): plan, pipeline, adopt, behind one verb.

Owns Load: claim the bytes (Reclaim if it must), decode the chunks still in memory into the working KV, ask the
planner which missing chunks to read and which to recompute, run the per-layer IO-recompute pipeline, and adopt what
it produced (read bytes as clean chunks, recomputed KV encoded at the chunk's level, unreadable chunks rebuilt and
counted); and Fault, a synchronous recompute that is counted and never expected. The budget work runs under the
ledger's lock; the reads and the model run outside it. Ignores the tokens no chunk covers (the store's tail) and how
chunks are sealed after a call.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmaas.kv.codec import ChunkGeometry, decode_into
from llmaas.kv.dense import DenseKVCache
from llmaas.memory.chunk import Chunk, ContextKV
from llmaas.memory.ledger import BudgetLedger
from llmaas.memory.policy import MemoryPolicy
from llmaas.memory.sealing import Sealer
from llmaas.model.transformer import Transformer
from llmaas.restore.cost_model import RestoreProfile
from llmaas.restore.pipeline import LoadItem, RestoreOutcome, Span, restore
from llmaas.restore.planner import MissingChunk, RestorePlan, plan_for_mode
from llmaas.storage.chunk_log import ChunkLog

log = logging.getLogger("llmaas.memory")


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


class Restorer:
    def __init__(self, ledger: BudgetLedger, sealer: Sealer, model: Transformer, buffer: DenseKVCache, log: ChunkLog,
                 geometry: ChunkGeometry, policy: MemoryPolicy, profile: RestoreProfile | None,
                 counters: Counter[str]) -> None:
        self.ledger, self.sealer, self.model, self.buffer, self.log = ledger, sealer, model, buffer, log
        self.geometry, self.policy, self.profile, self.counters = geometry, policy, profile, counters

    def load(self, ctx: ContextKV, missing: list[Chunk], token_ids: Sequence[int], report: SwitchReport) -> None:
        """Make every chunk of the (locked) context resident and decoded into the working KV."""
        buf = self.buffer
        t0 = time.perf_counter()
        with self.ledger.lock:
            report.waited_dirty += self.ledger.claim(sum(self.geometry.payload_bytes(c.level) for c in missing))
        report.reclaim_s = time.perf_counter() - t0
        resident = [c for c in ctx.chunks if c.is_resident]  # a locked context's chunks: reclaim skips them
        if resident:  # decode what is in memory (everything, on the common path of a warm context)
            self.decode_resident(resident)
        plan = self._plan(missing)
        by_index = {c.index: c for c in missing}
        # The plan loads only chunks that are on disk (the others are must_recompute): each has a location.
        loads = [LoadItem(i, by_index[i].disk_location, by_index[i].level, by_index[i].token_start, by_index[i].fill)
                 for i in plan.load]
        spans = [(by_index[i].token_start, by_index[i].fill) for i in plan.recompute]
        outcome = restore(self.model, buf, self.log, self.geometry, loads, spans, token_ids,
                          self.policy.layers_per_step)
        with self.ledger.lock:
            self._adopt(ctx, by_index, plan, outcome)
        if ctx.chunks and ctx.chunks[-1].staging is not None:  # the open chunk's exact values (only if it stayed)
            self.sealer.apply_staging(ctx.chunks[-1])
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

    def decode_resident(self, chunks: Sequence[Chunk]) -> None:
        """Decode resident chunks, every layer, into the working KV: all a hot switch does."""
        decode_into([c.resident_payload for c in chunks], [c.level for c in chunks], [c.token_start for c in chunks],
                    [c.fill for c in chunks], 0, self.geometry.spec.n_layers, self.buffer.kv, self.geometry)

    def _plan(self, missing: list[Chunk]) -> RestorePlan:
        chunks = [MissingChunk(c.index, c.level, self.geometry.payload_bytes(c.level), not c.is_on_disk)
                  for c in missing]
        return plan_for_mode(chunks, self.profile, self.policy.restore)

    def _adopt(self, ctx: ContextKV, by_index: dict[int, Chunk], plan: RestorePlan, outcome: RestoreOutcome) -> None:
        """Install what the restore produced: loaded bytes as clean chunks, recomputed KV encoded at its level."""
        for i, payload in outcome.payloads.items():
            self.ledger.set_resident(ctx, by_index[i], payload, None)
            by_index[i].location = outcome.locations[i]  # a compaction may have moved it: saves a lookup next time
        for i, why in zip(outcome.failed, outcome.failures, strict=True):
            log.warning("chunk %d of context %s was unreadable (%s); rebuilt by recompute", i, ctx.id, why)
            self.counters["corrupt_chunks"] += 1
            by_index[i].committed_version = None  # the disk copy is bad: the write-back replaces it
        rebuilt = [by_index[i] for i in (*plan.recompute, *outcome.failed)]
        for level in {c.level for c in rebuilt}:
            group = [c for c in rebuilt if c.level == level]
            for c, payload in zip(group, self.sealer.encode_from_buffer(group, level), strict=True):
                self.ledger.set_resident(ctx, c, payload, None)
            self.sealer.decode_back(group)

    def _fault(self, ctx: ContextKV, token_ids: Sequence[int]) -> None:
        """Fault: bring a missing chunk in during a call, synchronously, by recompute (counted; LLMS never needs it)."""
        missing = [c for c in ctx.chunks if not c.is_resident]
        self.counters["faults"] += len(missing)
        with self.ledger.lock:
            self.ledger.claim(sum(self.geometry.payload_bytes(c.level) for c in missing))
        restore(self.model, self.buffer, self.log, self.geometry, (), [(c.token_start, c.fill) for c in missing],
                token_ids)
        with self.ledger.lock:
            for c in missing:
                self.ledger.set_resident(ctx, c, self.sealer.encode_from_buffer([c], c.level)[0], None)
