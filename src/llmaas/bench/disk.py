"""The disk a restore benchmark reads from: cold sequential and cold random read bandwidth in one directory.

Owns "cold": a file is written, fsynced and dropped from this kernel's page cache (posix_fadvise DONTNEED) before
every timed read, the same way every system and peer in `llmaas bench restore` reads its state. Ignores caches
below this kernel (a VM host's page cache, the device's own), which no process can drop: report the figures next to
every restore time so a reader can tell a disk-bound result from a cache-bound one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MB = 1e6


@dataclass(frozen=True)
class DiskBandwidth:
    directory: str
    file_bytes: int                    # the sequential test file (random requests read from it too)
    repeats: int
    write_bytes_per_s: float           # one write + fsync of the whole file
    seq_read_bytes_per_s: float        # median over repeats, cold
    seq_read_s_all: tuple[float, ...]
    warm_read_bytes_per_s: float       # the same read from the page cache: shows the drop took effect
    random_request_bytes: int
    random_requests: int               # per repeat, distinct aligned offsets, one request in flight
    random_read_bytes_per_s: float     # median over repeats, cold
    random_latency_s: float            # median per request over all repeats
    random_latency_p90_s: float
    resident_after_drop: float | None  # fraction of the file still in the page cache after a drop (None: unknown)

    def __post_init__(self) -> None:
        if self.seq_read_bytes_per_s <= 0 or self.random_read_bytes_per_s <= 0:
            raise ValueError("bandwidths must be positive")

    def describe(self) -> str:
        resident = "" if self.resident_after_drop is None else f", {100 * self.resident_after_drop:.0f}% resident"
        return (f"disk at {self.directory}: cold sequential read {self.seq_read_bytes_per_s / MB:,.0f} MB/s "
                f"({self.file_bytes / MB:.0f} MB file, median of {self.repeats}{resident} after drop); "
                f"cold random {self.random_request_bytes / 1024:.0f} KiB reads {self.random_read_bytes_per_s / MB:,.0f}"
                f" MB/s, {1e3 * self.random_latency_s:.2f} ms each (p90 {1e3 * self.random_latency_p90_s:.2f} ms); "
                f"warm read {self.warm_read_bytes_per_s / MB:,.0f} MB/s; write+fsync {self.write_bytes_per_s / MB:,.0f}"
                " MB/s")

    def to_json(self) -> dict:
        return asdict(self)


def drop_from_page_cache(path: Path) -> None:
    """Write back and evict path's pages from this kernel's page cache, so the next read comes from the device.
    DONTNEED only evicts clean pages, hence the fsync first (cheap when the file is already clean)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Fraction of path's pages in the page cache (mincore on a shared read-only mapping), None where unavailable.
    A mapping never touched faults nothing in, so asking does not change the answer."""
    size = path.stat().st_size
    libc_name = ctypes.util.find_library("c")
    if size == 0 or libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def read_into(path: Path, buf) -> int:
    """Read path from its start into the writable buffer buf (no intermediate copy); returns the bytes read."""
    view = memoryview(buf).cast("B")
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
    return done


def _write_file(path: Path, nbytes: int, block_bytes: int) -> float:
    """Write nbytes of incompressible data and fsync; returns seconds for write + fsync."""
    block = os.urandom(block_bytes)  # one random block repeated: incompressible per block, cheap to make
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for start in range(0, nbytes, block_bytes):
            f.write(block[: min(block_bytes, nbytes - start)])
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _timed_read(path: Path, buf: bytearray) -> float:
    """Seconds to read all of path sequentially through buf (reused, so only the read is timed)."""
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - t0


def _random_reads(path: Path, offsets: list[int], request_bytes: int) -> list[float]:
    buf = bytearray(request_bytes)
    view = memoryview(buf)
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            t0 = time.perf_counter()
            n = os.preadv(fd, [view], off)
            latencies.append(time.perf_counter() - t0)
            assert n == request_bytes, (n, off)
    finally:
        os.close(fd)
    return latencies


class FloorProbe:
    """A file of `nbytes` incompressible bytes under `directory` (written and fsynced on entry, removed on exit);
    read_s() times one cold sequential read of it, as measure_disk does, whenever the caller wants one: a benchmark
    takes one next to each of its own measurements."""

    def __init__(self, directory: Path, nbytes: int, block_bytes: int = 4 * 2**20) -> None:
        if nbytes < 1:
            raise ValueError(f"a floor probe needs at least one byte, got {nbytes}")
        self.path = directory / f".llmaas-floor-probe-{os.getpid()}"
        self.nbytes, self.block_bytes = nbytes, block_bytes

    def __enter__(self) -> FloorProbe:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(self.path, self.nbytes, self.block_bytes)
        self._buf = bytearray(self.block_bytes)
        return self

    def read_s(self) -> float:
        drop_from_page_cache(self.path)
        return _timed_read(self.path, self._buf)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def measure_disk(directory: Path, *, file_bytes: int = 256 * 2**20, random_request_bytes: int = 180 * 1024,
                 random_requests: int = 200, repeats: int = 3, seed: int = 0) -> DiskBandwidth:
    """Cold sequential and random read bandwidth of the disk under directory (a temporary file, removed after).
    The default request size is one INT8 SmolLM2 chunk of 16 tokens."""
    if file_bytes < random_request_bytes * random_requests:
        raise ValueError(f"file_bytes {file_bytes} is too small for {random_requests} distinct requests of "
                         f"{random_request_bytes} bytes")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".llmaas-disk-probe-{os.getpid()}"
    block_bytes = 4 * 2**20
    try:
        write_s = _write_file(path, file_bytes, block_bytes)
        buf = bytearray(block_bytes)
        seq_s = []
        resident = None
        for _ in range(repeats):
            drop_from_page_cache(path)
            resident = resident_fraction(path) if resident is None else resident
            seq_s.append(_timed_read(path, buf))
        warm_s = _timed_read(path, buf)  # just read, so (all but a memory-pressed run) from the page cache
        rng = random.Random(seed)
        slots = file_bytes // random_request_bytes
        rand_s, latencies = [], []
        for _ in range(repeats):
            offsets = [i * random_request_bytes for i in rng.sample(range(slots), random_requests)]
            drop_from_page_cache(path)
            lat = _random_reads(path, offsets, random_request_bytes)
            rand_s.append(sum(lat))
            latencies += lat
    finally:
        path.unlink(missing_ok=True)
    latencies.sort()
    return DiskBandwidth(
        directory=str(directory), file_bytes=file_bytes, repeats=repeats, write_bytes_per_s=file_bytes / write_s,
        seq_read_bytes_per_s=file_bytes / statistics.median(seq_s), seq_read_s_all=tuple(seq_s),
        warm_read_bytes_per_s=file_bytes / warm_s, random_request_bytes=random_request_bytes,
        random_requests=random_requests,
        random_read_bytes_per_s=random_request_bytes * random_requests / statistics.median(rand_s),
        random_latency_s=statistics.median(latencies),
        random_latency_p90_s=latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        resident_after_drop=resident)
