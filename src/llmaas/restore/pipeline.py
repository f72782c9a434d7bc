"""The IO-recompute pipelined restore of LLMS §5: read some missing chunks while recomputing the others, per layer.

Owns the two-thread schedule: one IO thread reads layer group g+1 of the chunks to load while the compute thread,
having waited for all of group g, decodes it into the working KV and recomputes group g for the chunks to rebuild
(exact recompute of non-contiguous tokens at their true positions, attending to everything resident, loaded or
recomputed). Records a timeline of IO and compute spans. A chunk whose read fails verification is rebuilt by a second,
recompute-only pass (with the first pass's recomputes, which may have attended to it), so no unverified byte is ever
attended to. Ignores planning (the planner), budgets and chunk bookkeeping (the store).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from llmaas.kv.codec import ChunkGeometry, KVLevel, decode_into
from llmaas.kv.dense import DenseKVCache
from llmaas.model.transformer import Transformer
from llmaas.storage.chunk_index import ChunkLocation
from llmaas.storage.chunk_log import ChunkLog, ReadResult


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
    # Without recompute there is nothing to overlap with: one read of every layer is the fewest IO requests.
    step = layers_per_step if recompute else n_layers
    groups = [(g, min(step, n_layers - g)) for g in range(0, n_layers, step)]
    # Each loaded chunk's resident payload, read into in place: no copy out of a shared read buffer.
    payloads = [torch.empty(n_layers * item.location.section_bytes, dtype=torch.uint8) for item in loads]
    failed: dict[int, str] = {}

    def read(group: tuple[int, int]) -> tuple[list[ReadResult], float, float]:
        s = time.perf_counter()
        first, count = group
        sections = [p[first * item.location.section_bytes:(first + count) * item.location.section_bytes]
                    for p, item in zip(payloads, loads, strict=True)]
        results = log.read([item.location for item in loads], first, count, sections) if loads else []
        return results, s, time.perf_counter()

    rows = _rows(recompute, token_ids)
    h = model.embed(rows[0]) if rows is not None else None
    view = cache.rewrite(rows[1]) if rows is not None else None
    with ThreadPoolExecutor(1, thread_name_prefix="llmaas-restore-io") as io:
        futures = [io.submit(read, g) for g in groups]  # the IO thread runs ahead, group after group
        for (first, count), future in zip(groups, futures, strict=True):
            results, s, e = future.result()
            out.timeline.append(Span("io", first, count, s - t0, e - t0))
            ok: list[tuple[LoadItem, torch.Tensor]] = []
            for item, result in zip(loads, results, strict=True):
                if not result.ok:
                    failed.setdefault(item.chunk_index, str(result.fault))
                elif item.chunk_index not in failed:
                    assert result.payload is not None  # a read without a fault always carries its bytes (ReadResult)
                    ok.append((item, result.payload))
                    out.locations[item.chunk_index] = result.location
                    out.bytes_read += result.payload.nbytes
            c0 = time.perf_counter()
            if ok:
                decode_into([p for _, p in ok], [i.level for i, _ in ok], [i.token_start for i, _ in ok],
                            [i.fill for i, _ in ok], first, count, cache.kv, geometry)
            if h is not None:
                assert rows is not None and view is not None  # h, rows and view are set together, from rows
                model.run_layers(h, rows[1], view, first, first + count)
            out.timeline.append(Span("compute", first, count, c0 - t0, time.perf_counter() - t0))
    out.recomputed_tokens = 0 if rows is None else rows[0].numel()
    out.payloads = {item.chunk_index: p for item, p in zip(loads, payloads, strict=True)
                    if item.chunk_index not in failed}
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
