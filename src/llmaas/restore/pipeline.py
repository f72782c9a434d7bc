"""The IO-recompute pipelined restore of LLMS §5: read some missing chunks while recomputing the others, per layer.

Owns the schedule: the chunk log reads the chunks to load with its IO threads, in file order (layer-major, so layer
group g+1 is being read while group g is processed), and hands each group over once it is read and verified; the
compute thread decodes it into the working KV and recomputes group g for the chunks to rebuild (exact recompute of
non-contiguous tokens at their true positions, attending to everything resident, loaded or recomputed). Records a
timeline of IO and compute spans. A chunk whose read fails verification is rebuilt by a second, recompute-only pass
(with the first pass's recomputes, which may have attended to it), so no unverified byte is ever attended to.
Ignores planning (the planner), budgets and chunk bookkeeping (the store).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmaas.kv.codec import ChunkGeometry, KVLevel, decode_into
from llmaas.kv.dense import DenseKVCache
from llmaas.model.transformer import Transformer
from llmaas.storage.chunk_index import ChunkLocation
from llmaas.storage.chunk_log import ChunkLog, LayerBatch, ReadResult

# An IO-only restore hands the decode batches of this many layers while the rest is read: at 2,048 tokens one batch
# of all 30 layers left the whole decode (~4 ms) after the read, and batches of one layer cost ~2 ms more of
# per-chunk checks and slicing than they hide.
IO_LAYERS_PER_BATCH = 10


@dataclass(frozen=True)
class LoadItem:
    chunk_index: int
    location: ChunkLocation  # the chunk log's location of the committed version
    level: KVLevel
    token_start: int
    fill: int


@dataclass(frozen=True)
class Span:
    kind: str  # "io" or "compute"
    first_layer: int
    num_layers: int
    start_s: float  # relative to the restore's start
    end_s: float


@dataclass
class RestoreOutcome:
    payloads: dict[int, torch.Tensor] = field(default_factory=dict)  # loaded chunk index -> all layers' bytes
    locations: dict[int, ChunkLocation] = field(default_factory=dict)  # where they were read (moved by a compaction?)
    failed: list[int] = field(default_factory=list)  # chunks whose read failed and were recomputed instead
    failures: list[str] = field(default_factory=list)  # why
    recomputed_tokens: int = 0
    bytes_read: int = 0
    timeline: list[Span] = field(default_factory=list)
    elapsed_s: float = 0.0


def restore(model: Transformer, cache: DenseKVCache, log: ChunkLog, geometry: ChunkGeometry, loads: Sequence[LoadItem],
            recompute: Sequence[tuple[int, int]], token_ids: Sequence[int], layers_per_step: int = 1) -> RestoreOutcome:
    """Make the working cache hold the loaded chunks' decoded KV and the recomputed spans ([token_start, fill]) for
    every layer. The cache's num_tokens must already cover every span."""
    t0 = time.perf_counter()
    out = RestoreOutcome()
    n_layers = model.config.n_layers
    # Without recompute, batches only let the decode run behind the read: a few large ones (see IO_LAYERS_PER_BATCH).
    step = layers_per_step if recompute else IO_LAYERS_PER_BATCH
    # Each loaded chunk's resident payload, read into in place: no copy out of a shared read buffer.
    payloads = [torch.empty(n_layers * item.location.section_bytes, dtype=torch.uint8) for item in loads]
    rows = _rows(recompute, token_ids)
    h = model.embed(rows[0]) if rows is not None else None
    view = cache.rewrite(rows[1]) if rows is not None else None

    def compute(batch: LayerBatch) -> None:
        """Layers [first, first + count) are in for the batch's chunks: decode them, then recompute those layers
        (the recomputed rows attend to everything resident, loaded or recomputed)."""
        first, count = batch.first_layer, batch.num_layers
        if loads:
            out.timeline.append(Span("io", first, count, batch.io_start_s - t0, batch.io_end_s - t0))
        c0 = time.perf_counter()
        if batch.chunks:
            ok = [loads[i] for i in batch.chunks]
            decode_into([payloads[i] for i in batch.chunks], [it.level for it in ok], [it.token_start for it in ok],
                        [it.fill for it in ok], first, count, cache.kv, geometry, whole=True)
        if h is not None:
            assert rows is not None and view is not None  # h, rows and view are set together, from rows
            model.run_layers(h, rows[1], view, first, first + count)
        out.timeline.append(Span("compute", first, count, c0 - t0, time.perf_counter() - t0))

    results: list[ReadResult] = []
    if loads:  # the read calls compute() as each batch of layers is in, while it reads the next
        results = log.read([item.location for item in loads], 0, n_layers, payloads, compute, step)
    else:
        for first in range(0, n_layers, step):
            now = time.perf_counter()
            compute(LayerBatch(first, min(step, n_layers - first), [], now, now))
    failed: dict[int, str] = {}
    for item, payload, result in zip(loads, payloads, results, strict=True):
        if result.ok:
            out.payloads[item.chunk_index] = payload
            out.locations[item.chunk_index] = result.location
            out.bytes_read += payload.nbytes
        else:
            failed[item.chunk_index] = str(result.fault)
    out.recomputed_tokens = 0 if rows is None else rows[0].numel()
    if failed:  # rebuild them, and redo what may have attended to their unverified slots
        redo = sorted({(i.token_start, i.fill) for i in loads if i.chunk_index in failed} | set(recompute))
        again = restore(model, cache, log, geometry, (), redo, token_ids, layers_per_step)
        out.recomputed_tokens += again.recomputed_tokens
        out.failed, out.failures = sorted(failed), [failed[i] for i in sorted(failed)]
    out.elapsed_s = time.perf_counter() - t0
    return out


def _rows(spans: Sequence[tuple[int, int]], token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Token ids and true positions of the tokens to recompute, in position order."""
    if not spans:
        return None
    positions = torch.cat([torch.arange(s, s + n) for s, n in sorted(spans)])
    ids = torch.as_tensor(token_ids, dtype=torch.int64)[positions]
    return ids, positions
