"""Low-level IO on segment files: whole writes and reads, durability, page-cache dropping, and read coalescing.

Owns the system calls and the plan that turns many small byte ranges into a few large requests (cold reads cost a
fixed ~0.27 ms per request here, so neighbours are merged and small gaps read and discarded). Ignores what the
bytes mean and which ranges belong to which chunk beyond an opaque tag.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Buffer

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX"))
_libc = ctypes.CDLL(None, use_errno=True)
_libc.preadv.restype = ctypes.c_ssize_t
_libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]


def as_memoryview(array: np.ndarray) -> memoryview:
    """memoryview(array), typed: ndarray has the buffer protocol, but numpy's stubs declare it (__buffer__) only
    for Python >= 3.12, so on 3.11 a type checker does not know an array can be viewed."""
    return memoryview(cast("Buffer", array))


def pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
    """Write every buffer, in order, at `offset` (pwritev may write less than asked: loop). Returns bytes written."""
    bufs = [memoryview(b).cast("B") for b in buffers if len(b)]
    written, i = 0, 0
    while i < len(bufs):
        n = os.pwritev(fd, bufs[i:i + _IOV_MAX], offset + written)
        written += n
        i = _advance(bufs, i, n)
    return written


def _advance(bufs: list[memoryview], i: int, n: int) -> int:
    """After a short vectored transfer of n bytes starting at bufs[i]: skip the buffers it completed and trim the one
    it stopped inside (in place); returns the index of the first buffer still to transfer."""
    while n and i < len(bufs):
        if n >= len(bufs[i]):
            n -= len(bufs[i])
            i += 1
        else:
            bufs[i] = bufs[i][n:]
            n = 0
    return i


def pread_into(fd: int, dest: memoryview, offset: int) -> int:
    """Fill `dest` from `offset`; returns the bytes read (fewer only at end of file)."""
    got = 0
    while got < len(dest):
        n = os.preadv(fd, [dest[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def iovecs(address: int, length: int) -> np.ndarray:
    """One destination as an iovec array (see preadv_iov)."""
    return np.array([[address, length]], dtype=np.uint64)


def preadv_iov(fd: int, iov: np.ndarray, offset: int) -> int:
    """Fill the destinations of `iov` (uint64 [n, 2] of (address, length): C's struct iovec), in order, from
    consecutive bytes at `offset`; returns the bytes read (fewer only at end of file). A scattering read built from
    arrays instead of thousands of memoryviews (a 2,048-token context is ~3,800 pieces, and creating their objects
    cost ~1 ms plus an occasional full garbage collection of tens of ms). The caller keeps every destination alive.
    ctypes releases the GIL for the call, as os.preadv does."""
    iov = np.array(iov, dtype=np.uint64, order="C")  # trimmed in place after a short read: the caller's stays intact
    if iov.ndim != 2 or iov.shape[1] != 2:
        raise ValueError(f"iov must be [n, 2] (address, length), got shape {iov.shape}")
    got, i, n = 0, 0, len(iov)
    while i < n:
        count = min(_IOV_MAX, n - i)
        r = _libc.preadv(fd, iov[i:].ctypes.data, count, offset + got)
        if r < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, f"preadv: {os.strerror(err)}")
        if r == 0:
            break
        got += r
        ends = np.cumsum(iov[i:i + count, 1])
        done = int(np.searchsorted(ends, r, side="right"))  # pieces filled completely
        partial = r - (int(ends[done - 1]) if done else 0)
        i += done
        if partial:
            iov[i, 0] += np.uint64(partial)
            iov[i, 1] -= np.uint64(partial)
    return got


def aligned_empty(nbytes: int, align: int = PAGE_BYTES) -> np.ndarray:
    """An uninitialised uint8 array whose first byte lies at a multiple of `align` (O_DIRECT's buffers)."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + nbytes]


def fsync_dir(directory: Path) -> None:
    """Make file creations, renames and removals in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Evict the file's (clean) pages from the page cache: swapped KV must not stay in RAM uncounted (LLMS §7).
    The range is widened to whole pages, because DONTNEED leaves partly covered pages resident."""
    if length:
        start = offset - offset % PAGE_BYTES
        length = -(-(offset + length - start) // PAGE_BYTES) * PAGE_BYTES
        offset = start
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class Want:
    """A byte range some reader needs; `tag` is the reader's (e.g. (chunk, 'header'))."""

    segment: str
    offset: int
    length: int
    tag: object


@dataclass
class Span:
    """One read range: [offset, offset + length) of `segment`, covering `wants` (each at want.offset - offset)."""

    segment: str
    offset: int
    length: int
    wants: list[Want] = field(default_factory=list)
    array: np.ndarray | None = None  # uint8 [length], the read's buffer (pages scattered elsewhere stay untouched)
    valid_bytes: int = 0  # bytes known read (less than length once a request came back short: the file ended)
    error: OSError | None = None
    # Where the bytes go when some are scattered elsewhere, as pieces in file order that cover the whole span:
    # extent_at[k] is the file offset of piece k, extent_iov[k] its (address, length), extent_tag[k] the reader's
    # name for it (>= 0) or -1. None: all of it to `array`.
    extent_at: np.ndarray | None = None
    extent_iov: np.ndarray | None = None
    extent_tag: np.ndarray | None = None

    def view(self, want: Want) -> np.ndarray:
        assert self.array is not None
        start = want.offset - self.offset
        return self.array[start:start + want.length]

    def covers(self, want: Want) -> bool:
        return want.offset + want.length <= self.offset + self.valid_bytes


def coalesce(wants: Iterable[Want], max_gap_bytes: int) -> list[Span]:
    """Merge ranges of the same segment whose gap is at most `max_gap_bytes` into single spans (sorted by offset)."""
    spans: list[Span] = []
    for w in sorted(wants, key=lambda w: (w.segment, w.offset)):
        last = spans[-1] if spans else None
        if last and last.segment == w.segment and w.offset - (last.offset + last.length) <= max_gap_bytes:
            last.length = max(last.length, w.offset + w.length - last.offset)
            last.wants.append(w)
        else:
            spans.append(Span(w.segment, w.offset, w.length, [w]))
    return spans


def split(offset: int, length: int, piece_bytes: int) -> list[tuple[int, int]]:
    """Cut [offset, offset + length) into page-aligned pieces of at most about `piece_bytes`, in order: a large read
    runs as several parallel requests (3-4 in flight measured best on this VM's virtio disk), and a streaming read's
    first layers arrive while the rest are still being read."""
    pieces = max(1, -(-length // max(1, piece_bytes)))
    if pieces == 1:
        return [(offset, length)]
    step = -(-length // pieces)
    step = -(-step // PAGE_BYTES) * PAGE_BYTES
    out, at, end = [], offset, offset + length
    while at < end:
        out.append((at, min(step, end - at)))
        at += step
    return out
