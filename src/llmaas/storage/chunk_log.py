"""ChunkLog: the disk tier for KV chunks. Per-context append-only segment files of chunk records + a SQLite index.

Owns durability, atomic commit, verified reads (any layer range), compaction and crash recovery of chunk records.
Deviates from LLMS §7's "one file per chunk version", for measured reasons (scripts/bench_chunk_log.py, 128 chunks
of 113 KB, cold): 128 separate files read in ~35-70 ms, one contiguous 14 MB range in ~15-25 ms; and reading one
layer of the 128 chunks at a time (the restore pipeline's step) costs ~380 ms when each chunk's layers are
together but ~25 ms when each layer of the chunks is. So a write-back appends its chunks to the context's segment
in one request, as one group laid out layer-major across its chunks (chunk_layout.py): the whole group is one
range, and so is each of its layers. Ignores budgets, policies and what payloads mean (opaque layer-major bytes).
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
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from llmaas.storage.chunk_index import ChunkIndex, ChunkLocation
from llmaas.storage.chunk_layout import Run, cut_run, layout_write, plan_read
from llmaas.storage.chunk_record import (
    ChunkFault,
    ChunkRecord,
    RecordHeader,
    encode_header,
    header_size,
    parse_header,
    section_checksums,
    verify_sections,
)
from llmaas.storage.faults import DiskFaults
from llmaas.storage.segment_io import (
    Span,
    Want,
    as_memoryview,
    coalesce,
    drop_cache,
    fsync_dir,
    preadv_all,
    pwrite_all,
    split,
)
from llmaas.storage.throttle import DiskThrottle

INDEX_NAME = "index.sqlite"
SEGMENT_SUFFIX = ".seg"
TEMP_SUFFIX = ".tmp"
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger("llmaas.storage")


@dataclass(frozen=True)
class ChunkLogConfig:
    grouped: bool = True  # lay a write's chunks out layer-major across them (False: one lone record after another)
    io_threads: int = 3  # parallel preads of one large range (2-4 measured best on this VM)
    max_gap_bytes: int = 16 << 10  # ranges of one segment this close are read as one request, the gap discarded
    min_piece_bytes: int = 1 << 20  # a range is split across threads only into pieces at least this large
    max_segment_bytes: int = 256 << 20  # a context starts a new segment past this size
    compact_min_dead_bytes: int = 1 << 20  # compact a context when its dead bytes exceed its live ones and this,
    compact_max_groups: int = 16  # or when its live chunks lie in more groups than this (per-layer reads: 1 each)
    compact_buffer_bytes: int = 4 << 20  # compaction moves this many bytes of layers at a time (at least one layer)
    readahead: bool = False  # False: POSIX_FADV_RANDOM on reads, so the kernel reads exactly the requested bytes

    def __post_init__(self) -> None:
        if self.io_threads < 1 or self.min_piece_bytes < 1 or self.max_gap_bytes < 0 or self.compact_max_groups < 1:
            raise ValueError("io_threads, min_piece_bytes and compact_max_groups must be >= 1, max_gap_bytes >= 0")


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
             into: list[torch.Tensor] | None = None) -> list[ReadResult]:
        """Read and verify layers [first_layer, first_layer + num_layers) (default: to the last) of each chunk, in
        the order given. Never raises for a bad chunk: its result carries the fault and the caller recomputes it.
        `into[i]`: a uint8 tensor of exactly those layers' bytes that chunk i's payload is read into (and returned
        as), so a caller that keeps the bytes need not copy them out of a shared read buffer."""
        locs = list(locations)
        arrays: list[np.ndarray] | None = None
        if into is not None:
            if len(into) != len(locs):
                raise ValueError(f"{len(into)} buffers for {len(locs)} chunks")
            arrays = [t.numpy() for t in into]
        return self._read(locs, first_layer, num_layers, True, False, arrays)

    def _read(self, locs: list[ChunkLocation], first_layer: int, num_layers: int | None, retry_moved: bool,
              for_compaction: bool, into: list[np.ndarray] | None = None) -> list[ReadResult]:
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
        missing = self._read_spans(spans, scatter, for_compaction)
        span_of = {w.tag: sp for sp in spans for w in sp.wants}

        results: list[ReadResult | None] = [None] * len(locs)
        faults: list[tuple[int, ChunkFault]] = []
        moved: list[tuple[int, ChunkLocation]] = []
        current: dict[str, dict[int, ChunkLocation]] = {}
        for run in plan.runs:
            if run.segment in missing:
                for i, _, _ in run.members:
                    loc = locs[i]
                    if retry_moved and loc.context_id not in current:
                        current[loc.context_id] = self._index.locations(loc.context_id)
                    now = current.get(loc.context_id, {}).get(loc.chunk_index)
                    if now is not None and now.segment != loc.segment and now.version == loc.version \
                            and now.prefix_hash == loc.prefix_hash:
                        moved.append((i, now))  # compacted between the caller's locations() and this read
                    else:
                        faults.append((i, ChunkFault.MISSING))
                continue
            for i, got in cut_run(run, n, span_of):
                fault = self._check(locs[i], headers[i], plan.headers.get(i), span_of, got, first_layer)
                if fault is None:
                    assert not isinstance(got, str)  # _check faults every 'io_error' / 'truncated'
                    if into is not None and got.ctypes.data != into[i].ctypes.data:
                        np.copyto(into[i], got)  # not read in place (a chunk asked for twice, a per-layer run)
                        got = into[i]
                    results[i] = ReadResult(locs[i], torch.from_numpy(got))
                else:
                    faults.append((i, fault))
        with self._lock:
            for i, fault in faults:
                self._counters.faults[fault.value] += 1
                results[i] = ReadResult(locs[i], None, fault)
            if not for_compaction:
                done = [r.payload for r in results if r is not None and r.payload is not None]
                self._counters.records_read += len(done)
                self._counters.payload_bytes_read += sum(p.numel() for p in done)
        if moved:
            again = self._read([m for _, m in moved], first_layer, n, False, for_compaction,
                               None if into is None else [into[i] for i, _ in moved])
            for (i, _), r in zip(moved, again, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]  # every slot is filled above

    def _check(self, loc: ChunkLocation, header: RecordHeader | None, head: Want | None, span_of: dict[object, Span],
               sections: np.ndarray | str, first_layer: int) -> ChunkFault | None:
        """Verify the header (unless cached: then it was verified before) and the sections read."""
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
            header = parsed
            with self._lock:
                self._headers.setdefault(loc.segment, {})[loc.offset] = header
        if isinstance(sections, str):
            return ChunkFault.IO_ERROR if sections == "io_error" else ChunkFault.TRUNCATED
        if not verify_sections(header, as_memoryview(sections), first_layer):
            return ChunkFault.CHECKSUM
        return None

    def _read_spans(self, spans: list[Span], scatter: dict[object, Run], for_compaction: bool) -> set[str]:
        """Issue the reads (large spans split across the pool), then drop the segments' pages. Returns the segments
        that do not exist."""
        fds: dict[str, int] = {}
        missing: set[str] = set()
        # Opened under the lock that compaction unlinks under: either we hold the file open (and read the old bytes
        # after an unlink), or the index already points elsewhere (and _read retries there).
        with self._lock:
            for segment in {sp.segment for sp in spans}:
                try:
                    fds[segment] = os.open(self.directory / segment, os.O_RDONLY)
                except FileNotFoundError:
                    missing.add(segment)
        jobs = []
        outcomes: list[int | OSError] = []
        try:
            for fd in fds.values():
                if not self.config.readahead:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for sp in spans:
                if sp.segment in missing:
                    continue
                sp.array = np.empty(sp.length, dtype=np.uint8)
                sp.extents = _extents(sp, scatter)
                for off, n in split(sp.offset, sp.length, self.config.io_threads, self.config.min_piece_bytes):
                    jobs.append((sp, fds[sp.segment], sp.destinations(off, off + n), off, n))
            outcomes = self._run(jobs)
            for sp in spans:
                sp.valid_bytes = sp.length
            for (sp, _, _, off, n), got in zip(jobs, outcomes, strict=True):
                if isinstance(got, OSError):
                    sp.error = got
                elif got < n:
                    sp.valid_bytes = min(sp.valid_bytes, off - sp.offset + got)
        finally:
            for fd in fds.values():
                drop_cache(fd)
                os.close(fd)
        nbytes = sum(g for g in outcomes if not isinstance(g, OSError))
        with self._lock:
            if for_compaction:
                self._counters.compaction_bytes_read += nbytes
            else:
                self._counters.read_requests += len(jobs)
                self._counters.bytes_read += nbytes
        return missing

    def _run(self, jobs: list[tuple[Span, int, list[memoryview], int, int]]) -> list[int | OSError]:
        if len(jobs) <= 1 or self.config.io_threads == 1:
            return [self._pread(*job[1:]) for job in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="chunk-io")
        return list(self._pool.map(lambda job: self._pread(*job[1:]), jobs))

    def _pread(self, fd: int, dest: list[memoryview], offset: int, nbytes: int) -> int | OSError:
        try:
            with self._limiter.request(nbytes):
                return preadv_all(fd, dest, offset)
        except OSError as e:  # reported per chunk as ChunkFault.IO_ERROR, never dropped
            return e

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


def _extents(span: Span, scatter: dict[object, Run]) -> list[tuple[int, memoryview]] | None:
    """Where each byte of `span` goes: scattering runs' sections to their chunks' buffers, the rest (headers, other
    runs, gaps) to the span's own buffer. None when all of it goes to the span's buffer."""
    runs = [(w, scatter[w.tag]) for w in span.wants if w.tag in scatter]
    if not runs:
        return None
    assert span.array is not None
    own, out, at = as_memoryview(span.array), [], span.offset
    for want, run in sorted(runs, key=lambda wr: wr[0].offset):
        assert want.offset >= at, "a scattering run overlaps another range of the same read"
        if want.offset > at:
            out.append((at, own[at - span.offset:want.offset - span.offset]))
        out += run.extents(want.length // run.stride)
        at = want.offset + want.length
    if at < span.offset + span.length:
        out.append((at, own[at - span.offset:]))
    return out


def _describes(h: RecordHeader, loc: ChunkLocation) -> bool:
    return (h.chunk_index, h.version, h.level, h.token_start, h.token_end, h.fill, h.prefix_hash, h.n_layers,
            h.section_bytes, h.header_bytes, h.sections_rel, h.layer_stride) == (
        loc.chunk_index, loc.version, loc.level, loc.token_start, loc.token_end, loc.fill, loc.prefix_hash,
        loc.n_layers, loc.section_bytes, loc.header_bytes, loc.sections_offset - loc.offset, loc.layer_stride)
