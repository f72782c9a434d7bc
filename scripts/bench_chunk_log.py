"""Cold-read benchmark of the chunk log: one context of N chunk records in one segment vs the ideal sequential read.

Confirms the storage design (LLMS §7 deviation: records appended to per-context segments rather than one file per
chunk version) and the checksum choice. Every read is cold: pages are dropped with POSIX_FADV_DONTNEED first.
Usage: .venv/bin/python scripts/bench_chunk_log.py [--dir /var/tmp] [--chunks 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import xxhash

from llmaas.storage.chunk_log import ChunkLog, ChunkLogConfig
from llmaas.storage.chunk_record import ChunkRecord, chain_prefix_hash, section_seeds
from llmaas.storage.native import verify_checksums
from llmaas.storage.segment_io import drop_cache, fsync_dir, pread_into, split
from llmaas.storage.throttle import DiskThrottle


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_cache(fd)
    finally:
        os.close(fd)


def run_round_robin(cases: list[tuple[str, Callable[[], object], Callable[[], None]]],
                    repeats: int) -> list[tuple[str, float, float]]:
    """(name, median ms, min ms) per case. Cases take turns, so that noise from the shared machine spreads evenly."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (_, fn, before) in enumerate(cases):
            before()
            t = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t) * 1e3)
    return [(name, statistics.median(ts), min(ts)) for (name, _, _), ts in zip(cases, times, strict=True)]


def make_records(n: int, layers: int, section_bytes: int) -> list[ChunkRecord]:
    g = torch.Generator().manual_seed(0)
    records, h = [], b""
    for i in range(n):
        h = chain_prefix_hash(h, range(16 * i, 16 * i + 16))
        payload = torch.randint(0, 256, (layers * section_bytes,), dtype=torch.uint8, generator=g)
        records.append(ChunkRecord(i, 1, 8, 16 * i, 16 * i + 16, 16, h, layers, section_bytes, payload))
    return records


def read_plain(path: Path, total: int, pieces: int) -> None:
    buf = memoryview(bytearray(total))
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = split(0, total, max(1 << 20, -(-total // pieces)))
        if len(parts) == 1:
            pread_into(fd, buf, 0)
        else:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(parts)) as pool:
                list(pool.map(lambda p: pread_into(fd, buf[p[0]:p[0] + p[1]], p[0]), parts))
    finally:
        drop_cache(fd)
        os.close(fd)


def read_per_layer(path: Path, layers: int, chunks: int, record_bytes: int, header_bytes: int, section_bytes: int,
                   layer_major: bool) -> None:
    """What one read per layer costs with no overheads but syscalls: a layer of every chunk is either one range
    (a layout that is layer-major across chunks) or one range per chunk (records, as the chunk log stores them)."""
    block = chunks * section_bytes
    buf = memoryview(bytearray(block))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for layer in range(layers):
            if layer_major:
                pread_into(fd, buf, layer * block)
            else:
                for k in range(chunks):
                    at = k * record_bytes + header_bytes + layer * section_bytes
                    pread_into(fd, buf[k * section_bytes:(k + 1) * section_bytes], at)
            drop_cache(fd)  # as the chunk log does after each read() call
    finally:
        os.close(fd)


def checksum_speeds(section_bytes: int, total: int) -> None:
    data = memoryview(torch.randint(0, 256, (total,), dtype=torch.uint8).numpy())
    mb = total / 2**20
    print(f"\nchecksum speed over {mb:.1f} MB in {section_bytes}-byte sections (per-section calls, best of 5):")
    for name, fn in [("zlib.crc32", zlib.crc32), ("xxh3_64", xxhash.xxh3_64_intdigest),
                     ("xxh3_128", xxhash.xxh3_128_intdigest), ("xxh64", xxhash.xxh64_intdigest)]:
        best = min(_timed(lambda fn=fn: [fn(data[o:o + section_bytes]) for o in range(0, total, section_bytes)])
                   for _ in range(5))
        whole = min(_timed(lambda fn=fn: fn(data)) for _ in range(5))
        print(f"  {name:11s} {best / mb * 1e3:6.3f} ms/MB per section   {whole / mb * 1e3:6.3f} ms/MB in one call")


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure, not a tmpfs "
                    "(default /var/tmp)")
    ap.add_argument("--chunks", type=int, default=128, help="records in the context (default 128 = 2048 tokens)")
    ap.add_argument("--layers", type=int, default=30, help="layers per record (default 30, SmolLM2-135M)")
    ap.add_argument("--section-bytes", type=int, default=3840,
                    help="bytes per layer section (default 3840: a 113 KB record)")
    ap.add_argument("--repeats", type=int, default=7, help="cold reads per figure (default 7)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_chunk_log.", dir=args.dir))
    records = make_records(args.chunks, args.layers, args.section_bytes)
    locs, segments = {}, {}
    for grouped in (True, False):
        with ChunkLog(root / str(grouped), "bench-model", "bench-codec", config=ChunkLogConfig(grouped=grouped)) as log:
            t = time.perf_counter()
            locs[grouped] = log.write("ctx", records)
            write_ms = (time.perf_counter() - t) * 1e3
            segments[grouped] = log.segment_paths()[0]
        total = sum(loc.record_bytes for loc in locs[grouped])
        mb = total / 2**20
        layout = "one group (layer-major across chunks)" if grouped else "lone records (each chunk's layers together)"
        print(f"context: {args.chunks} chunks of {locs[grouped][0].record_bytes} B = {mb:.2f} MiB in one segment as "
              f"{layout} ({DiskThrottle().describe()}); write + fsync + commit {write_ms:.1f} ms")

    plain = root / "plain.bin"
    with open(plain, "wb") as f:
        f.write(os.urandom(total))
        f.flush()
        os.fsync(f.fileno())
    drop(plain)
    files = root / "files"
    files.mkdir()
    for loc in locs[True]:
        (files / f"{loc.chunk_index}.bin").write_bytes(os.urandom(loc.record_bytes))
    os.sync()
    fsync_dir(files)
    for p in files.iterdir():
        drop(p)

    def read_files() -> None:
        for p in sorted(files.iterdir()):
            fd = os.open(p, os.O_RDONLY)
            pread_into(fd, memoryview(bytearray(os.fstat(fd).st_size)), 0)
            drop_cache(fd)
            os.close(fd)

    logs = []  # opened once per configuration: their header caches warm up on the first round, as in service

    def log_case(name: str, config: ChunkLogConfig, group: int) -> tuple[str, Callable[[], object], Callable[[], None]]:
        log = ChunkLog(root / str(config.grouped), "bench-model", "bench-codec", config=config)
        logs.append(log)
        mine = locs[config.grouped]

        def read() -> None:
            for first in range(0, args.layers, group):
                assert all(r.ok for r in log.read(mine, first, min(group, args.layers - first)))
        return name, read, lambda: drop(segments[config.grouped])

    cases = [(f"ideal: plain file, {p} pread(s)", lambda p=p: read_plain(plain, total, p), lambda: drop(plain))
             for p in (1, 2, 4)]
    cases.append(("one file per chunk, sequential preads", read_files, lambda: None))
    for threads in (1, 2, 3, 4):
        cases.append(log_case(f"chunk log, group, all layers, {threads} thread(s)",
                              ChunkLogConfig(io_threads=threads), args.layers))
    cases.append(log_case("chunk log, group, all layers, 3 threads, readahead on",
                          ChunkLogConfig(readahead=True), args.layers))
    cases.append(log_case("chunk log, lone records, all layers, 3 threads", ChunkLogConfig(grouped=False),
                          args.layers))
    for grouped in (True, False):
        for group in (1, 6):
            name = "group" if grouped else "lone records"
            cases.append(log_case(f"chunk log, {name}, {group} layer(s) per read() call",
                                  ChunkLogConfig(grouped=grouped), group))
    lone = locs[False][0]
    for layer_major in (False, True):
        name = "layer-major across chunks (1 pread" if layer_major else "records (1 pread per chunk"
        cases.append((f"ideal per-layer reads, {name} per layer)",
                      lambda lm=layer_major: read_per_layer(plain, args.layers, args.chunks, lone.record_bytes,
                                                            lone.header_bytes, args.section_bytes, lm),
                      lambda: drop(plain)))
    rows = run_round_robin(cases, args.repeats)
    log = logs[0]
    results = log.read(locs[True])
    headers = [log._headers[loc.segment][loc.offset] for loc in locs[True]]
    size = np.array([h.section_bytes for h in headers], dtype=np.int64)
    base = np.array([r.payload.data_ptr() for r in results], dtype=np.int64)
    layer = np.arange(args.layers, dtype=np.int64)
    addresses = (base[:, None] + layer[None, :] * size[:, None]).reshape(-1)
    sums = np.array([h.checksums for h in headers], dtype=np.uint64).reshape(-1)
    seeds = np.tile(section_seeds(0, args.layers), len(headers))

    def verify() -> None:
        assert verify_checksums(addresses, np.repeat(size, args.layers), seeds, sums).all()

    verify_ms = min(_timed(verify) for _ in range(7)) * 1e3
    for log in logs:
        log.close()
    print(f"\ncold reads of {mb:.2f} MiB (median and min of {args.repeats}, cases interleaved):")
    for name, ms, best in rows:
        print(f"  {name:68s} {ms:6.1f} ms ({best:5.1f} min)  {mb / ms * 1e3:5.0f} MiB/s")
    print(f"\nverification of all sections (xxh3_64, in memory, one native call): {verify_ms:.2f} ms = "
          f"{verify_ms / mb:.3f} ms/MiB")
    checksum_speeds(args.section_bytes, total)
    for p in sorted(root.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    root.rmdir()


if __name__ == "__main__":
    main()
