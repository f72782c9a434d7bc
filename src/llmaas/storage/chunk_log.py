"""ChunkLog: the disk tier for KV chunks. Per-context append-only segment files of chunk records + a SQLite index.

Owns durability, atomic commit, verified reads (any layer range), compaction and crash recovery of chunk records.
Deviates from LLMS §7's "one file per chunk version", for measured reasons (scripts/bench_chunk_log.py, 128 chunks
of 113 KB, cold): 128 separate files read in ~35-70 ms, one contiguous 14 MB range in ~15-25 ms; and reading one
layer of the 128 chunks at a time (the restore pipeline's step) costs ~380 ms when each chunk's layers are
together but ~25 ms when each layer of the chunks is. So a write-back appends its chunks to the context's segment
in one request, as one group laid out layer-major across its chunks (chunk_layout.py): the whole group is one
range, and so is each of its layers. A read goes past the page cache where the filesystem allows it (O_DIRECT into
one aligned buffer; else buffered, its pages dropped), as ~1 MB requests in file order on a few IO threads, cut
between sections; each request lands its pieces on its own thread in one native call (checks their checksums, copies
them to the chunks' buffers), and the caller can take the layers batch by batch as they complete (a restore decodes
behind the read). Ignores budgets, policies and what payloads mean (opaque layer-major bytes).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from llmaas.storage.chunk_index import ChunkIndex, ChunkLocation
from llmaas.storage.chunk_layout import Run, cut_run, layout_write, needed_ends, plan_read
from llmaas.storage.chunk_record import (
    ChunkFault,
    ChunkRecord,
    RecordHeader,
    encode_header,
    header_size,
    parse_header,
    section_checksums,
    section_seeds,
)
from llmaas.storage.faults import DiskFaults
from llmaas.storage.native import (
    CHECKSUM,
    DESTINATION,
    LENGTH,
    SEED,
    SLOT,
    SOURCE,
    land_pieces,
    verify_checksums,
)
from llmaas.storage.segment_io import (
    PAGE_BYTES,
    Span,
    Want,
    aligned_empty,
    as_memoryview,
    coalesce,
    drop_cache,
    fsync_dir,
    iovecs,
    preadv_iov,
    pwrite_all,
    split,
)
from llmaas.storage.throttle import DiskThrottle, ThrottleLimiter

INDEX_NAME = "index.sqlite"
SEGMENT_SUFFIX = ".seg"
TEMP_SUFFIX = ".tmp"
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger("llmaas.storage")


@dataclass(frozen=True)
class ChunkLogConfig:
    grouped: bool = True  # lay a write's chunks out layer-major across them (False: one lone record after another)
    io_threads: int = 3  # requests of one read in flight (3-4 measured best on this VM's virtio disk)
    max_gap_bytes: int = 16 << 10  # ranges of one segment this close are read as one request, the gap discarded
    read_piece_bytes: int = 1 << 20  # a large range is read as requests of about this size, in file order
    max_segment_bytes: int = 256 << 20  # a context starts a new segment past this size
    compact_min_dead_bytes: int = 1 << 20  # compact a context when its dead bytes exceed its live ones and this,
    compact_max_groups: int = 16  # or when its live chunks lie in more groups than this (per-layer reads: 1 each)
    compact_buffer_bytes: int = 4 << 20  # compaction moves this many bytes of layers at a time (at least one layer)
    readahead: bool = False  # False: POSIX_FADV_RANDOM on reads, so the kernel reads exactly the requested bytes
    # Read with O_DIRECT where the filesystem allows it (tmpfs does not: then buffered reads, dropped after): no page
    # cache to fill, copy out of and drop. A 15 MB read cost 1.6 ms of CPU so against 6.8 ms buffered (AMD EPYC
    # Zen 4 VM, same wall time), and the restore's decode runs on the same two cores meanwhile.
    direct_io: bool = True

    def __post_init__(self) -> None:
        if self.io_threads < 1 or self.read_piece_bytes < 1 or self.max_gap_bytes < 0 or self.compact_max_groups < 1:
            raise ValueError("io_threads, read_piece_bytes and compact_max_groups must be >= 1, max_gap_bytes >= 0")


@dataclass(frozen=True)
class ReadResult:
    # The location actually read: after a compaction moved the chunk, its new place (callers may keep it).
    location: ChunkLocation
    # uint8 [num_layers * section_bytes], the requested layers' sections, contiguous. May be a view into a read
    # buffer shared with other chunks of the same read: copy or decode it, then drop it.
    payload: torch.Tensor | None
    fault: ChunkFault | None = None

    @property
    def ok(self) -> bool:
        return self.fault is None


@dataclass(frozen=True)
class ChunkLogStats:
    bytes_written: int  # by write() (headers included)
    bytes_read: int  # from disk by read(), gaps and headers included
    payload_bytes_read: int  # verified section bytes returned by read()
    records_written: int
    records_read: int  # chunks returned verified by read()
    corrupt_chunks: int  # chunks refused (by read() or found by compaction), every reason
    faults: dict[str, int]  # ChunkFault value -> count
    write_requests: int
    read_requests: int  # preads issued by read() (after coalescing and splitting)
    compactions: int
    compaction_bytes_read: int
    compaction_bytes_written: int
    compaction_failures: int


@dataclass(frozen=True)
class RecoveryReport:
    rows_removed: int  # of contexts no longer alive
    files_removed: int  # temp files and unreferenced segments
    bytes_removed: int
    bytes_truncated: int  # uncommitted tails of referenced segments (a crash mid-append)


@dataclass
class _Counters:
    bytes_written: int = 0
    bytes_read: int = 0
    payload_bytes_read: int = 0
    records_written: int = 0
    records_read: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    write_requests: int = 0
    read_requests: int = 0
    compactions: int = 0
    compaction_bytes_read: int = 0
    compaction_bytes_written: int = 0
    compaction_failures: int = 0


def _file_stem(context_id: str) -> str:
    """Context ids become file names only when they are plainly safe; others are hashed ('@' never appears in safe
    ones, so the two kinds cannot collide, and '.' separates the stem from the sequence number)."""
    if _SAFE_ID.fullmatch(context_id):
        return context_id
    return "@" + hashlib.sha256(context_id.encode()).hexdigest()[:32]


def _seq_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else 0


class ChunkLog:
    def __init__(self, directory: str | Path, model_id: str, codec_id: str, throttle: DiskThrottle | None = None,
                 config: ChunkLogConfig | None = None, faults: DiskFaults | None = None) -> None:
        """faults: the reliability check's injected write/fsync errors (storage/faults.py); None in production."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.model_id, self.codec_id = model_id, codec_id
        self.throttle = throttle or DiskThrottle()
        self.config = config or ChunkLogConfig()
        self._limiter = self.throttle.limiter()
        self.faults = (faults or DiskFaults()).injector()
        self._index = ChunkIndex(self.directory / INDEX_NAME)
        self._lock = threading.RLock()  # header cache, counters, _active, and segment opens vs unlinks
        self._write_lock = threading.Lock()  # one writer at a time: write, compact, delete_context, recover
        self._active: dict[str, str] = {}  # context -> segment being appended to
        self._headers: dict[str, dict[int, RecordHeader]] = {}  # segment -> header offset -> verified header
        self._counters = _Counters()
        self._pool: ThreadPoolExecutor | None = None
        names = [p.name for p in self.directory.iterdir() if p.suffix in (SEGMENT_SUFFIX, TEMP_SUFFIX)]
        self._next_seq = 1 + max((_seq_of(n) for n in names), default=0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._index.close()

    def __enter__(self) -> ChunkLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- write ---------------------------------------------------------------------------------------------------

    def write(self, context_id: str, records: Sequence[ChunkRecord]) -> list[ChunkLocation]:
        """Append `records` to the context's segment in one request, fsync, drop them from the page cache, then
        commit their index rows in one transaction: before that commit none is visible, after it all are. A later
        version of a chunk replaces the committed one whatever its number. Compacts the context when due. Raises
        OSError when the disk refuses the bytes, the fsync or the index row (then nothing of it is visible)."""
        records = list(records)
        if not records:
            return []
        if len({r.chunk_index for r in records}) != len(records):
            raise ValueError("a write may hold each chunk index at most once")
        if len({r.n_layers for r in records}) != 1:
            raise ValueError("the records of one write must have the same number of layers")
        sums = [section_checksums(r) for r in records]  # outside the lock: the CPU-heavy part
        with self._write_lock:
            segment, fd, base, is_new = self._open_for_append(context_id)
            try:
                locations, buffers = self._lay_out(context_id, records, sums, segment, base)
                total = sum(len(b) for b in buffers)
                self._append(fd, buffers, base, is_new)
            except BaseException:
                # Leave no stray bytes behind (they would only be dead bytes, but a full disk wants them back).
                # The original error is what the caller needs; a failed clean-up is left for recover().
                with contextlib.suppress(OSError):
                    if is_new:
                        os.unlink(self.directory / segment)
                    else:
                        os.ftruncate(fd, base)
                raise
            finally:
                os.close(fd)
            try:
                replaced = self._index.commit(locations)  # <- the commit point
            except sqlite3.OperationalError as exc:  # the index's disk is full or failing: the same failed write
                raise OSError(errno.EIO, f"the chunk index refused the write: {exc}") from exc
            with self._lock:
                self._active[context_id] = segment
                for old in replaced:
                    self._headers.get(old.segment, {}).pop(old.offset, None)
                c = self._counters
                c.bytes_written += total
                c.records_written += len(records)
                c.write_requests += 1
            try:
                self._maybe_compact(context_id)
            except OSError:
                # The write is committed and correct; a failed compaction only leaves dead bytes (its partial
                # output is removed) and is retried at the next write. Counted and logged, not raised, so the
                # caller does not take a committed write for a failed one.
                log.warning("compaction of context %r failed; retried at its next write", context_id, exc_info=True)
                with self._lock:
                    self._counters.compaction_failures += 1
        return locations

    def _lay_out(self, context_id: str, records: list[ChunkRecord], sums: list[list[int]], segment: str,
                 base: int) -> tuple[list[ChunkLocation], list[bytes | memoryview]]:
        n_layers = records[0].n_layers
        sizes = [r.section_bytes for r in records]
        layout = layout_write([header_size(n_layers, self.model_id, self.codec_id)] * len(records), sizes, n_layers,
                              self.config.grouped)
        headers, locations = [], []
        for r, s, p in zip(records, sums, layout.placements, strict=True):
            headers.append(encode_header(r, self.model_id, self.codec_id, s, p.sections_at - p.header_at,
                                         p.layer_stride))
            group_at = base if layout.is_grouped else base + p.header_at
            locations.append(ChunkLocation(context_id, r.chunk_index, r.version, r.level, r.token_start, r.token_end,
                                           r.fill, r.prefix_hash, segment, base + p.header_at,
                                           p.header_bytes + r.n_layers * r.section_bytes, p.header_bytes,
                                           r.section_bytes, r.n_layers, base + p.sections_at, p.layer_stride,
                                           group_at))
        views = [r.payload_view() for r in records]
        buffers: list[bytes | memoryview] = []
        if layout.is_grouped:
            buffers += headers
            for layer in range(n_layers):
                buffers += [v[layer * s:(layer + 1) * s] for v, s in zip(views, sizes, strict=True)]
        else:
            for h, v in zip(headers, views, strict=True):
                buffers += [h, v]
        return locations, buffers

    def _append(self, fd: int, buffers: list[bytes | memoryview], base: int, is_new: bool) -> None:
        total = sum(len(b) for b in buffers)
        with self._limiter.request(total):
            self.faults.check("write")
            pwrite_all(fd, buffers, base)
            self.faults.check("fsync")
            os.fsync(fd)
        if is_new:
            fsync_dir(self.directory)
        drop_cache(fd)

    def _open_for_append(self, context_id: str) -> tuple[str, int, int, bool]:
        segment = self._active.get(context_id)
        if segment is None:
            referenced = self._index.segment_live_bytes(context_id)
            segment = max(referenced, key=_seq_of) if referenced else None
        if segment is not None:
            try:
                fd = os.open(self.directory / segment, os.O_WRONLY)
            except FileNotFoundError:
                pass
            else:
                size = os.fstat(fd).st_size
                if size < self.config.max_segment_bytes:
                    return segment, fd, size, False
                os.close(fd)
        return self._create_segment(context_id)

    def _create_segment(self, context_id: str) -> tuple[str, int, int, bool]:
        with self._lock:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
        segment = f"{_file_stem(context_id)}.{seq:08d}{SEGMENT_SUFFIX}"
        return segment, os.open(self.directory / segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0, True

    # -- index queries -------------------------------------------------------------------------------------------

    def locations(self, context_id: str) -> dict[int, ChunkLocation]:
        """The committed chunk versions of a context, by chunk index."""
        return self._index.locations(context_id)

    def context_ids(self) -> list[str]:
        return self._index.context_ids()

    def segment_paths(self, context_id: str | None = None) -> list[Path]:
        """Segment files on disk (of one context, or all), for audits such as the page-cache honesty check."""
        pattern = f"{_file_stem(context_id)}.*{SEGMENT_SUFFIX}" if context_id is not None else f"*{SEGMENT_SUFFIX}"
        return sorted(self.directory.glob(pattern))

    def disk_bytes(self) -> tuple[int, int]:
        """(live chunk bytes, segment file bytes): the difference is dead bytes awaiting compaction."""
        live = self._index.live_totals()[1]
        return live, sum(p.stat().st_size for p in self.segment_paths())

    def stats(self) -> ChunkLogStats:
        with self._lock:
            c = self._counters
            return ChunkLogStats(c.bytes_written, c.bytes_read, c.payload_bytes_read, c.records_written,
                                 c.records_read, sum(c.faults.values()), dict(c.faults), c.write_requests,
                                 c.read_requests, c.compactions, c.compaction_bytes_read, c.compaction_bytes_written,
                                 c.compaction_failures)

    # -- read ----------------------------------------------------------------------------------------------------

    def read(self, locations: Iterable[ChunkLocation], first_layer: int = 0, num_layers: int | None = None,
             into: list[torch.Tensor] | None = None, on_layers: Callable[[LayerBatch], None] | None = None,
             layers_per_batch: int | None = None) -> list[ReadResult]:
        """Read and verify layers [first_layer, first_layer + num_layers) (default: to the last) of each chunk, in
        the order given. Never raises for a bad chunk: its result carries the fault and the caller recomputes it.
        `into[i]`: a uint8 tensor of exactly those layers' bytes that chunk i's payload is read into (and returned
        as), so a caller that keeps the bytes need not copy them out of a shared read buffer.
        `on_layers` (needs `into`): called in this thread each time `layers_per_batch` more layers (default: all)
        of the chunks have been read and verified, while the disk goes on reading the rest, so a restore decodes
        and recomputes layer by layer behind the read. The chunks a batch leaves out have failed; a chunk may fail
        in a later batch after earlier ones passed (its result then carries the fault)."""
        locs = list(locations)
        arrays: list[np.ndarray] | None = None
        if into is not None:
            if len(into) != len(locs):
                raise ValueError(f"{len(into)} buffers for {len(locs)} chunks")
            arrays = [t.numpy() for t in into]
        elif on_layers is not None or layers_per_batch is not None:
            raise ValueError("a read in batches of layers (on_layers, layers_per_batch) needs `into` buffers")
        if layers_per_batch is not None and layers_per_batch < 1:
            raise ValueError(f"layers_per_batch must be >= 1, got {layers_per_batch}")
        return self._read(locs, first_layer, num_layers, True, False, arrays, on_layers, layers_per_batch)

    def _read(self, locs: list[ChunkLocation], first_layer: int, num_layers: int | None, retry_moved: bool,
              for_compaction: bool, into: list[np.ndarray] | None = None,
              on_layers: Callable[[LayerBatch], None] | None = None,
              layers_per_batch: int | None = None) -> list[ReadResult]:
        if not locs:
            return []
        n = locs[0].n_layers - first_layer if num_layers is None else num_layers
        for i, loc in enumerate(locs):
            if first_layer < 0 or n < 1 or first_layer + n > loc.n_layers:
                raise ValueError(f"layers [{first_layer}, {first_layer + n}) outside chunk {loc.chunk_index}'s "
                                 f"{loc.n_layers} layers")
            if into is not None and into[i].shape != (n * loc.section_bytes,):
                raise ValueError(f"buffer of shape {into[i].shape} for {n} layers of {loc.section_bytes} bytes")
        with self._lock:
            headers = [self._headers.get(loc.segment, {}).get(loc.offset) for loc in locs]
        plan = plan_read(locs, first_layer, n, [h is not None for h in headers], into)
        spans = coalesce(plan.wants, self.config.max_gap_bytes)
        scatter = {run.wants[0].tag: run for run in plan.runs if run.gathered is not None}
        faults: dict[int, ChunkFault] = {}
        got_bytes: dict[int, np.ndarray] = {}
        with _Reading(self, spans, scatter, for_compaction, _Verifier(locs, headers, first_layer, n, into)) as reading:
            if reading.missing and retry_moved:
                moved = self._moved(locs, reading.missing)
                if moved:  # compacted between the caller's locations() and this read: read them where they are now
                    reading.cancel()
                    return self._read([moved.get(i, loc) for i, loc in enumerate(locs)], first_layer, n, False,
                                      for_compaction, into, on_layers, layers_per_batch)
            for run in plan.runs:
                if run.segment in reading.missing:
                    faults.update((i, ChunkFault.MISSING) for i, _, _ in run.members)
            reading.submit()
            span_of = {w.tag: sp for sp in spans for w in sp.wants}
            runs = [run for run in plan.runs if run.segment not in reading.missing]
            step = layers_per_batch or n
            for first in range(0, n, step):
                end = min(n, first + step)
                io_start, io_end = reading.wait(needed_ends(plan, runs, end))
                batch: list[int] = []
                for run in runs:
                    for i, got in cut_run(run, first, end, span_of):
                        if i in faults:
                            continue
                        fault = self._check(locs, headers, i, plan.headers.get(i), span_of, got, reading.verifier)
                        if fault is not None:
                            faults[i] = fault
                            continue
                        assert not isinstance(got, str)  # _check faults every 'io_error' / 'truncated'
                        if into is not None and i not in run.in_place:
                            # not read in place (a chunk asked for twice, a per-layer run)
                            into[i][first * locs[i].section_bytes:end * locs[i].section_bytes] = got
                        elif into is None:
                            got_bytes[i] = got  # one batch of all layers (read() allows no other without into)
                        batch.append(i)
                bad = reading.verifier.verify(batch, first, end - first, got_bytes)
                faults.update((i, ChunkFault.CHECKSUM) for i in bad)
                if on_layers is not None:
                    on_layers(LayerBatch(first_layer + first, end - first, [i for i in batch if i not in bad],
                                         io_start, io_end))
        results = [ReadResult(loc, None, faults[i]) if i in faults
                   else ReadResult(loc, torch.from_numpy(into[i] if into is not None else got_bytes[i]))
                   for i, loc in enumerate(locs)]
        with self._lock:
            for fault in faults.values():
                self._counters.faults[fault.value] += 1
            if not for_compaction:
                self._counters.records_read += len(locs) - len(faults)
                self._counters.payload_bytes_read += sum(r.payload.numel() for r in results if r.payload is not None)
        return results

    def _moved(self, locs: list[ChunkLocation], missing: set[str]) -> dict[int, ChunkLocation]:
        """The chunks of missing segments that a compaction moved, unchanged, elsewhere: position -> new location."""
        current: dict[str, dict[int, ChunkLocation]] = {}
        moved: dict[int, ChunkLocation] = {}
        for i, loc in enumerate(locs):
            if loc.segment not in missing:
                continue
            if loc.context_id not in current:
                current[loc.context_id] = self._index.locations(loc.context_id)
            now = current[loc.context_id].get(loc.chunk_index)
            if now is not None and now.segment != loc.segment and now.version == loc.version \
                    and now.prefix_hash == loc.prefix_hash:
                moved[i] = now
        return moved

    def _check(self, locs: list[ChunkLocation], headers: list[RecordHeader | None], i: int, head: Want | None,
               span_of: dict[object, Span], sections: np.ndarray | str, verifier: _Verifier) -> ChunkFault | None:
        """Chunk i's header is valid (verified once: then cached, in `headers` and for later reads) and its
        sections' bytes are all there (their checksums: _Verifier)."""
        loc, header = locs[i], headers[i]
        if header is None:
            assert head is not None
            hsp = span_of[head.tag]
            if hsp.error is not None:
                return ChunkFault.IO_ERROR
            if not hsp.covers(head):
                return ChunkFault.TRUNCATED
            parsed = parse_header(as_memoryview(hsp.view(head)), self.model_id, self.codec_id)
            if isinstance(parsed, ChunkFault):
                return parsed
            if not _describes(parsed, loc):
                return ChunkFault.MISMATCH
            headers[i] = parsed
            verifier.learn(i, parsed)
            with self._lock:
                self._headers.setdefault(loc.segment, {})[loc.offset] = parsed
        if isinstance(sections, str):
            return ChunkFault.IO_ERROR if sections == "io_error" else ChunkFault.TRUNCATED
        return None

    def _pool_for_reads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="chunk-io")
        return self._pool

    # -- compaction, deletion, recovery --------------------------------------------------------------------------

    def compact(self, context_id: str) -> int:
        """Rewrite the context's live chunks, verified, as one group in chunk order in a new segment, commit, then
        delete the old segments. Chunks that fail verification are dropped (their rows deleted in the same
        commit). Returns the bytes reclaimed."""
        with self._write_lock:
            return self._compact_locked(context_id)

    def _context_segments(self, context_id: str) -> tuple[int, set[str]]:
        live = self._index.segment_live_bytes(context_id)
        segments = set(live)
        if context_id in self._active:
            segments.add(self._active[context_id])
        return sum(live.values()), segments

    def _size(self, segment: str) -> int:
        try:
            return (self.directory / segment).stat().st_size
        except FileNotFoundError:
            return 0

    def _maybe_compact(self, context_id: str) -> None:
        live_bytes, segments = self._context_segments(context_id)
        dead_bytes = sum(self._size(s) for s in segments) - live_bytes
        fragmented = self.config.grouped and self._index.group_count(context_id) > self.config.compact_max_groups
        if fragmented or (dead_bytes > live_bytes and dead_bytes >= self.config.compact_min_dead_bytes):
            self._compact_locked(context_id)

    def _compact_locked(self, context_id: str) -> int:
        rows = sorted(self._index.locations(context_id).values(), key=lambda r: r.chunk_index)
        live_bytes, old = self._context_segments(context_id)
        before = sum(self._size(s) for s in old)
        if not rows:
            self._remove_segments(old)
            self._active.pop(context_id, None)
            return before
        in_order = all(a.offset < b.offset for a, b in itertools.pairwise(rows))
        groups = self._index.group_count(context_id)
        if len(old) == 1 and before == live_bytes and (groups == 1 if self.config.grouped else in_order):
            return 0  # already tidy: one segment, no dead bytes, one group (or lone records in chunk order)
        segment, fd, _, _ = self._create_segment(context_id)
        try:
            moved, lost = self._rewrite(rows, segment, fd)
            os.fsync(fd)
            fsync_dir(self.directory)
            drop_cache(fd)
            after = os.fstat(fd).st_size
        except BaseException:
            with contextlib.suppress(OSError):  # the copy's own error is the one to report
                os.unlink(self.directory / segment)
            raise
        finally:
            os.close(fd)
        self._index.commit(moved, delete=lost)  # <- the commit point: rows now name the new segment
        self._remove_segments(old)
        with self._lock:
            self._active[context_id] = segment
            self._counters.compactions += 1
            self._counters.compaction_bytes_written += after
        return before - after

    def _rewrite(self, rows: list[ChunkLocation], segment: str,
                 fd: int) -> tuple[list[ChunkLocation], list[ChunkLocation]]:
        """Copy the rows' chunks, verified, a few layers at a time, to the start of `fd` in the configured layout.
        Returns the moved rows and the rows lost (unreadable: not copied, their bytes zeros)."""
        n_layers = rows[0].n_layers
        if any(r.n_layers != n_layers for r in rows):
            raise ValueError("a context's chunks must all have the same number of layers")
        sizes = [r.section_bytes for r in rows]
        hsize = header_size(n_layers, self.model_id, self.codec_id)
        layout = layout_write([hsize] * len(rows), sizes, n_layers, self.config.grouped)
        step = max(1, self.config.compact_buffer_bytes // sum(sizes))
        good = [True] * len(rows)
        for first in range(0, n_layers, step):
            count = min(step, n_layers - first)
            results = self._read(rows, first, count, retry_moved=False, for_compaction=True)
            pieces: list[tuple[int, bytes | memoryview]] = []
            for k, (res, p) in enumerate(zip(results, layout.placements, strict=True)):
                good[k] = good[k] and res.ok
                s = sizes[k]
                if good[k]:
                    assert res.payload is not None  # a result without a fault carries its payload
                    data = as_memoryview(res.payload.numpy())
                else:
                    data = memoryview(bytes(count * s))
                pieces += [(p.sections_at + (first + j) * p.layer_stride, data[j * s:(j + 1) * s])
                           for j in range(count)]
            self._write_pieces(fd, pieces)
        moved: list[ChunkLocation] = []
        lost: list[ChunkLocation] = []
        headers: list[tuple[int, bytes | memoryview]] = []  # _write_pieces sorts it in place: list, not Sequence
        with self._lock:
            verified = [self._headers.get(r.segment, {}).get(r.offset) for r in rows]
        for r, p, ok, h in zip(rows, layout.placements, good, verified, strict=True):
            if not ok or h is None:
                lost.append(r)
                headers.append((p.header_at, bytes(p.header_bytes)))
                continue
            headers.append((p.header_at, encode_header(r, self.model_id, self.codec_id, h.checksums,
                                                       p.sections_at - p.header_at, p.layer_stride)))
            moved.append(replace(r, segment=segment, offset=p.header_at, sections_offset=p.sections_at,
                                 layer_stride=p.layer_stride, group_offset=0 if layout.is_grouped else p.header_at))
        self._write_pieces(fd, headers)
        return moved, lost

    def _write_pieces(self, fd: int, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """pwrite (offset, bytes) pieces, adjacent ones in one request."""
        pieces.sort(key=lambda piece: piece[0])
        i = 0
        while i < len(pieces):
            j, end = i + 1, pieces[i][0] + len(pieces[i][1])
            while j < len(pieces) and pieces[j][0] == end:
                end += len(pieces[j][1])
                j += 1
            with self._limiter.request(end - pieces[i][0]):
                pwrite_all(fd, [b for _, b in pieces[i:j]], pieces[i][0])
            i = j

    def _remove_segments(self, segments: Iterable[str]) -> int:
        removed = 0
        with self._lock:
            for s in segments:
                self._headers.pop(s, None)
                with contextlib.suppress(FileNotFoundError):
                    removed += (self.directory / s).stat().st_size
                    os.unlink(self.directory / s)
        fsync_dir(self.directory)
        return removed

    def delete_context(self, context_id: str) -> int:
        """Remove the context's rows, then its segment files. Returns the rows removed."""
        with self._write_lock:
            rows = self._index.delete_context(context_id)
            segments = {r.segment for r in rows} | {p.name for p in self.segment_paths(context_id)}
            if context_id in self._active:
                segments.add(self._active.pop(context_id))
            self._remove_segments(segments)
        return len(rows)

    def delete_chunks(self, context_id: str, first_index: int) -> int:
        """Remove the context's rows from chunk first_index on; their bytes are dead and go when the context's next
        write compacts it. Returns the rows removed."""
        with self._write_lock:
            rows = [r for i, r in self._index.locations(context_id).items() if i >= first_index]
            if not rows:
                return 0
            self._index.commit([], delete=rows)
            with self._lock:
                for r in rows:
                    self._headers.get(r.segment, {}).pop(r.offset, None)
        return len(rows)

    def recover(self, live_context_ids: Iterable[str]) -> RecoveryReport:
        """At startup, before any write: drop rows of contexts no longer alive, delete temp files and segments no
        row references, and cut uncommitted tails (a crash mid-append) off the others."""
        live = set(live_context_ids)
        with self._write_lock:
            rows_removed = 0
            for context_id in self._index.context_ids():
                if context_id not in live:
                    rows_removed += len(self._index.delete_context(context_id))
                    self._active.pop(context_id, None)
            ends = self._index.segment_ends()
            doomed = [p.name for p in self.directory.iterdir()
                      if p.suffix == TEMP_SUFFIX or (p.suffix == SEGMENT_SUFFIX and p.name not in ends)]
            bytes_removed = self._remove_segments(doomed)
            truncated = 0
            for segment, end in ends.items():
                size = self._size(segment)
                if size > end:
                    fd = os.open(self.directory / segment, os.O_WRONLY)
                    try:
                        os.ftruncate(fd, end)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    truncated += size - end
            self._active = {c: s for c, s in self._active.items() if c in live}
        return RecoveryReport(rows_removed, len(doomed), bytes_removed, truncated)


class _Verifier:
    """The section checksums of one read. A request checks the sections it brought in right after they land, on its
    IO thread, in native code, while they are still in the CPU's cache (when the chunk's header was known before the
    read: state 1 good, 2 bad); the caller's thread checks the rest (chunks whose headers this read parsed, copies,
    reads with no scatter) a batch of layers at a time, in one call. ~3,800 sections per 2,048-token context: one
    Python call each cost more than the restore's decode."""

    def __init__(self, locs: list[ChunkLocation], headers: list[RecordHeader | None], first_layer: int,
                 num_layers: int, into: list[np.ndarray] | None) -> None:
        self.first_layer, self.n = first_layer, num_layers
        self.size = np.array([loc.section_bytes for loc in locs], dtype=np.int64)
        self.base = None if into is None else np.array([a.ctypes.data for a in into], dtype=np.int64)
        self.seeds = section_seeds(first_layer, num_layers)
        self.sums = np.zeros((len(locs), num_layers), dtype=np.uint64)
        self.known = np.array([h is not None for h in headers], dtype=bool)  # rows of sums filled before any request
        for i, h in enumerate(headers):
            if h is not None:
                self.learn(i, h)
        self.state = np.zeros((len(locs), num_layers), dtype=np.uint8)  # 0 unchecked, 1 good, 2 bad

    def learn(self, i: int, header: RecordHeader) -> None:
        """Chunk i's header, parsed by this read (its sections are then checked by verify, not by the requests)."""
        self.sums[i] = header.checksums[self.first_layer:self.first_layer + self.n]

    def landing(self, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seed, checksum, slot) columns of a landing table (storage/native.py) for pieces tagged `tags`: a slot
        in `state` where the piece is a section whose checksum was known before the read, else -1."""
        position, layer = tags // self.n, tags % self.n
        check = (tags >= 0) & self.known[np.maximum(position, 0)]
        seed = np.where(check, self.seeds[layer].view(np.int64), 0)
        checksum = np.where(check, self.sums[np.maximum(position, 0), layer].view(np.int64), 0)
        return seed, checksum, np.where(check, tags, -1)

    def verify(self, batch: list[int], first: int, count: int, got: dict[int, np.ndarray]) -> set[int]:
        """The chunks of `batch` whose sections of layers [first, first + count) (of the read) do not match their
        checksums, checking those the requests did not. Their bytes are in the read's `into` buffers, else in
        got[i]."""
        if not batch:
            return set()
        rows = np.array(batch, dtype=np.int64)
        state = self.state[rows, first:first + count]
        todo_row, todo_layer = np.nonzero(state == 0)
        if todo_row.size:
            position, layer = rows[todo_row], first + todo_layer
            if self.base is not None:
                base = self.base[position]
            else:
                base = np.array([got[i].ctypes.data for i in position.tolist()], dtype=np.int64)  # first == 0
            ok = verify_checksums(base + layer * self.size[position], self.size[position], self.seeds[layer],
                                  self.sums[position, layer])
            state[todo_row, todo_layer] = np.where(ok, 1, 2)
        return {i for i, good in zip(batch, (state == 1).all(axis=1).tolist(), strict=True) if not good}


@dataclass(frozen=True)
class LayerBatch:
    """Layers [first_layer, first_layer + num_layers) of `chunks` (positions in the read's request) are read and
    verified. io_start_s / io_end_s (perf_counter): when the first request they needed began, the last one ended."""

    first_layer: int
    num_layers: int
    chunks: list[int]
    io_start_s: float
    io_end_s: float


@dataclass
class _Request:
    """One read request, and what its IO thread does after: land its pieces (a landing table: check the sections,
    copy out of a direct read's aligned buffer) or nothing (the caller checks), and drop a buffered read's pages."""

    span: Span
    fd: int
    iov: np.ndarray
    offset: int
    nbytes: int
    direct: bool
    table: np.ndarray | None
    state: np.ndarray
    future: Future[tuple[int | OSError, float, float]] | None = None
    outcome: int | OSError | None = None
    start_s: float = 0.0
    end_s: float = 0.0

    def run(self, limiter: ThrottleLimiter) -> tuple[int | OSError, float, float]:
        """Read and land (off the caller's path; a buffered read's pages dropped at once, so swapped KV never
        lingers in the page cache). Returns (bytes read or the error, start, end)."""
        start = time.perf_counter()
        try:
            with limiter.request(self.nbytes):
                got: int | OSError = preadv_iov(self.fd, self.iov, self.offset)
            if self.table is not None and self.table.size:
                land_pieces(self.table, self.state)  # after a short read the missing ones fail; so do their chunks
            if not self.direct:
                drop_cache(self.fd, self.offset, self.nbytes)
        except OSError as e:  # reported per chunk as ChunkFault.IO_ERROR, never dropped
            got = e
        return got, start, time.perf_counter()


class _Reading:
    """One read's requests in flight: opened segments (under the lock compaction unlinks under: either we hold the
    file open and read the old bytes after an unlink, or the index already points elsewhere and the caller reads
    there), requests submitted in file order to the log's IO threads, waited for a prefix at a time, and on exit
    every request finished, the pages read dropped from the page cache, the files closed and the bytes counted."""

    def __init__(self, log: ChunkLog, spans: list[Span], scatter: dict[object, Run], for_compaction: bool,
                 verifier: _Verifier) -> None:
        self.log, self.spans, self.scatter, self.for_compaction = log, spans, scatter, for_compaction
        self.verifier = verifier
        self.fds: dict[str, int] = {}
        self.direct: set[str] = set()  # segments opened with O_DIRECT
        self.missing: set[str] = set()
        self.requests: list[_Request] = []
        self._done = 0  # requests[:_done] have been waited for and applied to their spans

    def __enter__(self) -> _Reading:
        with self.log._lock:
            for segment in {sp.segment for sp in self.spans}:
                try:
                    self.fds[segment] = self._open(segment)
                except FileNotFoundError:
                    self.missing.add(segment)
        return self

    def _open(self, segment: str) -> int:
        path = self.log.directory / segment
        if self.log.config.direct_io and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no direct IO
                    raise
            else:
                self.direct.add(segment)
                return fd
        fd = os.open(path, os.O_RDONLY)
        if not self.log.config.readahead:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def cancel(self) -> None:
        """Nothing will be read: close the files now."""
        self._close()

    def submit(self) -> None:
        """Build the requests and start each at once (the first are being read while the rest are built), on the
        IO threads when there will be several, else later in the caller's thread."""
        spans = [sp for sp in self.spans if sp.segment not in self.missing]
        config = self.log.config
        pool = self.log._pool_for_reads() if config.io_threads > 1 and \
            sum(sp.length for sp in spans) > config.read_piece_bytes else None
        for sp in spans:
            for r in self._requests_for(sp):
                if pool is not None:
                    r.future = pool.submit(r.run, self.log._limiter)
                    if len(self.requests) < config.io_threads:
                        # Let the IO thread take the GIL and start its read now: building the rest holds the GIL,
                        # and the first reads waited ~1 ms for it (CPython hands it over only every 5 ms).
                        time.sleep(0)
                self.requests.append(r)

    def _requests_for(self, sp: Span) -> Iterator[_Request]:
        """A direct read lands whole pages in one aligned buffer; a buffered one goes straight to where the bytes
        belong (the kernel copies them out of the page cache). A span that scatters is cut between its pieces, so
        each section arrives whole in one request, which lands it."""
        fd, direct, piece = self.fds[sp.segment], sp.segment in self.direct, self.log.config.read_piece_bytes
        state = self.verifier.state
        sp.valid_bytes = sp.length
        lo = sp.offset - sp.offset % PAGE_BYTES if direct else sp.offset
        hi = -(-(sp.offset + sp.length) // PAGE_BYTES) * PAGE_BYTES if direct else sp.offset + sp.length
        pages = aligned_empty(hi - lo) if direct else np.empty(hi - lo, dtype=np.uint8)
        sp.array = pages[sp.offset - lo:sp.offset - lo + sp.length]
        sp.extent_at, sp.extent_iov, sp.extent_tag = _extents(sp, self.scatter)
        if sp.extent_at is None or sp.extent_iov is None or sp.extent_tag is None:  # all to the span's own buffer
            for off, n in split(lo, hi - lo, piece):
                yield _Request(sp, fd, iovecs(pages.ctypes.data + off - lo, n), off, n, direct, None, state)
            return
        at, iov = sp.extent_at, sp.extent_iov
        table = np.empty((6, len(at)), dtype=np.int64)
        table[DESTINATION], table[LENGTH] = iov[:, 0].view(np.int64), iov[:, 1].view(np.int64)
        table[SOURCE] = pages.ctypes.data + at - lo if direct else table[DESTINATION]
        table[SEED], table[CHECKSUM], table[SLOT] = self.verifier.landing(sp.extent_tag)
        work = (table[SOURCE] != table[DESTINATION]) | (table[SLOT] >= 0)
        targets = np.arange(sp.offset + piece, sp.offset + sp.length, piece)
        cuts = [0, *np.unique(np.searchsorted(at, targets)).tolist(), len(at)]
        for c0, c1 in itertools.pairwise(dict.fromkeys(cuts)):  # piece ranges, in file order
            start, end = int(at[c0]), int(at[c1]) if c1 < len(at) else sp.offset + sp.length
            if direct:  # whole pages: neighbours may both read the page they share (the same bytes)
                start, end = start - start % PAGE_BYTES, -(-end // PAGE_BYTES) * PAGE_BYTES
                request_iov = iovecs(pages.ctypes.data + start - lo, end - start)
            else:
                request_iov = iov[c0:c1]
            mine = table[:, c0:c1][:, work[c0:c1]]
            yield _Request(sp, fd, request_iov, start, end - start, direct, mine, state)

    def wait(self, ends: dict[str, int]) -> tuple[float, float]:
        """Wait for every request up to the last one that starts below ends[segment] in a segment of `ends`, apply
        their outcomes to their spans, and return when the first of those began and the last ended."""
        last = max((k for k, r in enumerate(self.requests) if r.offset < ends.get(r.span.segment, -1)), default=-1)
        for r in self.requests[self._done:last + 1]:
            r.outcome, r.start_s, r.end_s = r.future.result() if r.future is not None else r.run(self.log._limiter)
            if isinstance(r.outcome, OSError):
                r.span.error = r.outcome
            elif r.outcome < r.nbytes:
                r.span.valid_bytes = min(r.span.valid_bytes, r.offset + r.outcome - r.span.offset)
        self._done = max(self._done, last + 1)
        used = [r for r in self.requests[:last + 1] if r.span.segment in ends]
        now = time.perf_counter()
        return min((r.start_s for r in used), default=now), max((r.end_s for r in used), default=now)

    def __exit__(self, *exc: object) -> None:
        pending = [r for r in self.requests[self._done:] if r.future is not None]
        futures.wait([r.future for r in pending if r.future is not None])  # never close files under a request
        self._close()
        for r in pending:
            r.outcome = r.future.result()[0] if r.future is not None and r.future.exception() is None else None
        nbytes = sum(r.outcome for r in self.requests if isinstance(r.outcome, int))
        with self.log._lock:
            if self.for_compaction:
                self.log._counters.compaction_bytes_read += nbytes
            else:
                self.log._counters.read_requests += len(self.requests)
                self.log._counters.bytes_read += nbytes

    def _close(self) -> None:
        fds, self.fds = self.fds, {}
        for segment, fd in fds.items():
            if segment not in self.direct:
                drop_cache(fd)  # the requests dropped what they read; this catches pages two of them shared
            os.close(fd)


def _extents(span: Span, scatter: dict[object, Run]) -> tuple[np.ndarray | None, np.ndarray | None,
                                                            np.ndarray | None]:
    """Where each byte of `span` goes (Span.extent_at, extent_iov, extent_tag): scattering runs' sections to their
    chunks' buffers, the rest (headers, other runs, gaps; tag -1) to the span's own buffer. (None, None, None) when
    all of it goes to the span's buffer."""
    runs = [(w, scatter[w.tag]) for w in span.wants if w.tag in scatter]
    if not runs:
        return None, None, None
    assert span.array is not None
    own = span.array.ctypes.data - span.offset  # address of file offset x in the span's buffer: own + x
    ats: list[np.ndarray] = []
    iovs: list[np.ndarray] = []
    tags: list[np.ndarray] = []
    untagged = np.array([-1], dtype=np.int64)
    at = span.offset
    for want, run in sorted(runs, key=lambda wr: wr[0].offset):
        assert want.offset >= at, "a scattering run overlaps another range of the same read"
        if want.offset > at:
            ats.append(np.array([at], dtype=np.int64))
            iovs.append(iovecs(own + at, want.offset - at))
            tags.append(untagged)
        run_at, run_iov, run_tag = run.extents(want.length // run.stride)
        ats.append(run_at)
        iovs.append(run_iov)
        tags.append(run_tag)
        at = want.offset + want.length
    if at < span.offset + span.length:
        ats.append(np.array([at], dtype=np.int64))
        iovs.append(iovecs(own + at, span.offset + span.length - at))
        tags.append(untagged)
    return np.concatenate(ats), np.concatenate(iovs), np.concatenate(tags)


def _describes(h: RecordHeader, loc: ChunkLocation) -> bool:
    return (h.chunk_index, h.version, h.level, h.token_start, h.token_end, h.fill, h.prefix_hash, h.n_layers,
            h.section_bytes, h.header_bytes, h.sections_rel, h.layer_stride) == (
        loc.chunk_index, loc.version, loc.level, loc.token_start, loc.token_end, loc.fill, loc.prefix_hash,
        loc.n_layers, loc.section_bytes, loc.header_bytes, loc.sections_offset - loc.offset, loc.layer_stride)
