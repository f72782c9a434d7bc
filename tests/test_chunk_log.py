"""The disk tier for KV chunks: round trips, coalescing, crash safety (kill -9), corruption detection, compaction,
page-cache honesty (mincore), the throttle, deletion and recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmaas.storage.chunk_log import ChunkLog, ChunkLogConfig
from llmaas.storage.chunk_record import ChunkFault, ChunkRecord, chain_prefix_hash
from llmaas.storage.page_cache import cached_pages, cached_pages_all
from llmaas.storage.throttle import DiskThrottle

MODEL, CODEC = "tiny-llama@0123abcd", "int8-v1"


def make_record(i: int, version: int = 1, layers: int = 4, section_bytes: int = 512, level: int = 8) -> ChunkRecord:
    """Chunk i of a context whose token ids are 0, 1, 2, ...; payload bytes determined by (i, version)."""
    h = b""
    for c in range(i + 1):
        h = chain_prefix_hash(h, range(16 * c, 16 * c + 16))
    g = torch.Generator().manual_seed(1000 * i + version)
    payload = torch.randint(0, 256, (layers * section_bytes,), dtype=torch.uint8, generator=g)
    return ChunkRecord(i, version, level, 16 * i, 16 * i + 16, 16, h, layers, section_bytes, payload)


def sections(record: ChunkRecord, first: int, n: int) -> torch.Tensor:
    s = record.section_bytes
    return record.payload[first * s:(first + n) * s]


LAYOUTS = [pytest.param(True, id="grouped"), pytest.param(False, id="lone-records")]


@pytest.fixture(params=LAYOUTS)
def log(tmp_path, request):
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=ChunkLogConfig(grouped=request.param)) as chunk_log:
        yield chunk_log


def end_of(locs) -> int:
    """Where the last byte of these chunks lies."""
    return max(max(loc.offset + loc.header_bytes, loc.section_offset(loc.n_layers - 1) + loc.section_bytes)
               for loc in locs)


def reopen(log: ChunkLog, **kw) -> ChunkLog:
    return ChunkLog(log.directory, kw.pop("model_id", MODEL), kw.pop("codec_id", CODEC), config=log.config, **kw)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# -- round trips -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("layers", "section_bytes"), [(1, 1), (3, 100), (30, 3840), (4, 65536 + 7)])
def test_round_trip_any_layer_range(log, layers, section_bytes):
    records = [make_record(i, layers=layers, section_bytes=section_bytes) for i in range(5)]
    locs = log.write("ctx", records)
    assert log.locations("ctx") == {loc.chunk_index: loc for loc in locs}
    ranges = {(0, None), (0, 1), (layers - 1, 1), (layers // 2, layers - layers // 2)}
    for first, n in sorted(ranges, key=str):
        results = log.read(locs, first, n)
        for rec, res in zip(records, results, strict=True):
            assert res.ok and res.location.chunk_index == rec.chunk_index
            assert torch.equal(res.payload, sections(rec, first, layers - first if n is None else n))
    with pytest.raises(ValueError, match="outside"):
        log.read(locs, layers, 1)


@pytest.mark.parametrize("grouped", LAYOUTS)
def test_coalesced_reads_equal_individual_reads(tmp_path, grouped):
    # Three write-backs, the second re-versioning some chunks, so live records are interleaved with dead ones.
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=ChunkLogConfig(grouped=grouped)) as log:
        log.write("ctx", [make_record(i) for i in range(6)])
        log.write("ctx", [make_record(i, version=2) for i in (1, 4)] + [make_record(6)])
        log.write("ctx", [make_record(i) for i in range(7, 10)])
        locs = list(log.locations("ctx").values())
    expected = {loc.chunk_index: make_record(loc.chunk_index, loc.version) for loc in locs}
    configs = [ChunkLogConfig(grouped=grouped, max_gap_bytes=0, io_threads=1),
               ChunkLogConfig(grouped=grouped, max_gap_bytes=1 << 20),
               ChunkLogConfig(grouped=grouped, max_gap_bytes=1 << 20, io_threads=3, read_piece_bytes=4096)]
    for config in configs:
        with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=config) as log:
            for first, n in ((0, None), (1, 2), (3, 1), (0, 1)):
                together = log.read(locs, first, n)
                alone = [log.read([loc], first, n)[0] for loc in reversed(locs)][::-1]
                for a, b in zip(together, alone, strict=True):
                    rec = expected[a.location.chunk_index]
                    assert a.ok and b.ok and torch.equal(a.payload, b.payload)
                    assert torch.equal(a.payload, sections(rec, first, 4 - first if n is None else n))
            if config.max_gap_bytes:
                before = log.stats()
                log.read(locs)
                after = log.stats()  # one span, in pieces of about read_piece_bytes (cut between sections)
                pieces = -(-(after.bytes_read - before.bytes_read) // config.read_piece_bytes)
                assert 1 <= after.read_requests - before.read_requests <= pieces + 1


def test_one_layer_of_a_group_is_one_request(tmp_path):
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=ChunkLogConfig(max_gap_bytes=0)) as log:
        locs = log.write("ctx", [make_record(i, layers=6, section_bytes=3000, level=8 - 2 * (i % 3))
                                 for i in range(10)])
        log.read(locs, 0, 1)  # the first read also fetches (and caches) the headers
        before = log.stats().read_requests
        for layer in range(1, 6):
            results = log.read(locs[3:7] if layer == 5 else locs, layer, 1)
            assert all(r.ok for r in results)
        assert log.stats().read_requests - before == 5
        assert torch.equal(log.read(locs, 2, 3)[4].payload, sections(make_record(4, layers=6, section_bytes=3000),
                                                                     2, 3))


def test_mixed_section_sizes_and_sparse_subsets(log):
    # one write-back holding chunks at different levels (different section sizes), read whole, sparse and in parts
    sizes = [3000, 1500, 750, 3000, 1500, 750, 3000]
    records = [make_record(i, layers=5, section_bytes=s) for i, s in enumerate(sizes)]
    locs = log.write("ctx", records)
    for pick in ([0, 1, 2, 3, 4, 5, 6], [0, 2, 5], [6, 1], [3, 3, 4]):
        for first, n in ((0, None), (1, 3), (4, 1), (0, 2)):
            results = log.read([locs[k] for k in pick], first, n)
            for k, res in zip(pick, results, strict=True):
                assert res.ok and torch.equal(res.payload, sections(records[k], first, 5 - first if n is None else n))


def test_reads_into_caller_buffers_land_in_place(log):
    # the restore reads each chunk's layers straight into its resident payload: same bytes, no other buffer kept
    sizes = [3000, 1500, 750, 3000, 1500]
    records = [make_record(i, layers=5, section_bytes=s) for i, s in enumerate(sizes)]
    locs = log.write("ctx", records)
    for pick in ([0, 1, 2, 3, 4], [0, 2, 4], [3, 3, 1]):
        for first, n in ((0, 5), (1, 3), (4, 1)):
            into = [torch.full((n * sizes[k],), 7, dtype=torch.uint8) for k in pick]
            results = log.read([locs[k] for k in pick], first, n, into)
            for k, buf, res in zip(pick, into, results, strict=True):
                assert res.ok and torch.equal(buf, sections(records[k], first, n))
                assert res.payload.data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="buffer of shape"):
        log.read(locs[:1], 0, 2, [torch.empty(5, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="2 buffers for 1 chunks"):
        log.read(locs[:1], 0, 1, [torch.empty(3000, dtype=torch.uint8)] * 2)


def test_write_validates_its_input(log):
    with pytest.raises(ValueError, match="at most once"):
        log.write("ctx", [make_record(0), make_record(0, version=2)])
    with pytest.raises(ValueError, match="same number of layers"):
        log.write("ctx", [make_record(0), make_record(1, layers=5)])
    with pytest.raises(ValueError, match="bytes"):
        replace(make_record(0), section_bytes=100)
    with pytest.raises(ValueError, match="prefix_hash"):
        replace(make_record(0), prefix_hash=b"short")
    assert log.write("ctx", []) == []


def test_unsafe_context_ids_and_newer_versions(log):
    cid = "app/1: ctx ../x"
    log.write(cid, [make_record(0), make_record(1)])
    log.write(cid, [make_record(1, version=5, level=4)])
    locs = log.locations(cid)
    assert [(c, loc.version, loc.level) for c, loc in locs.items()] == [(0, 1, 8), (1, 5, 4)]
    assert all("/" not in p.name for p in log.segment_paths(cid)) and log.segment_paths(cid)
    res = log.read(locs.values())
    assert torch.equal(res[1].payload, make_record(1, version=5).payload)


# -- crash safety ----------------------------------------------------------------------------------------------------

BIG = {"layers": 30, "section_bytes": 4096}


_WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
from llmaas.storage import chunk_log
from test_chunk_log import BIG, CODEC, MODEL, make_record
directory, mode = sys.argv[1], sys.argv[2]
log = chunk_log.ChunkLog(directory, MODEL, CODEC)
log.write("ctx", [make_record(i, 1, **BIG) for i in range(8)])
print("committed ctx 1", flush=True)

def stall(*args, **kwargs):
    print("stalled", flush=True)
    time.sleep(60)

if mode == "mid_write":  # half the bytes reach the disk, then the writer dies
    def half_then_stall(fd, buffers, offset):
        data = b"".join(bytes(b) for b in buffers)
        os.pwrite(fd, data[:len(data) // 2], offset)
        os.fsync(fd)
        stall()
    chunk_log.pwrite_all = half_then_stall
    log.write("ctx", [make_record(i, 2, **BIG) for i in range(4, 12)])
elif mode == "before_commit":  # every byte durable in a new segment, but the index commit never happens
    log._index.commit = stall
    log.write("ctx2", [make_record(i, 1, **BIG) for i in range(8)])
else:  # killed at some moment while writing batch after batch (re-versions, compactions)
    for version in range(2, 1000):
        log.write("ctx", [make_record(i, version, **BIG) for i in range(8)])
        print(f"committed ctx {version}", flush=True)
"""


@pytest.mark.parametrize("mode", ["mid_write", "before_commit", "random"])
def test_kill9_during_write_leaves_only_committed_chunks(tmp_path, mode):
    # A fresh interpreter, not a bare fork: a fork of this (threaded) test process can deadlock in the child.
    directory = tmp_path / "kv"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), mode, str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    last_version = 0
    try:
        for line in child.stdout:
            if line.startswith("committed ctx"):
                last_version = int(line.split()[-1])
                if mode == "random" and last_version >= 3:
                    time.sleep(0.003 * (os.getpid() % 7))  # somewhere inside a later write
                    break
            elif line.startswith("stalled"):
                break
    finally:
        child.send_signal(signal.SIGKILL)
        status = child.wait(timeout=30)
        for line in child.stdout:  # commits reported after we stopped listening
            if line.startswith("committed ctx"):
                last_version = int(line.split()[-1])
        child.stdout.close()
    assert status == -signal.SIGKILL, "the writer exited by itself: see its traceback above"

    with ChunkLog(directory, MODEL, CODEC) as log:
        locs = log.locations("ctx")
        assert sorted(locs) == list(range(8))  # no chunk of an uncommitted batch is visible
        versions = {loc.version for loc in locs.values()}
        # all-or-nothing per batch: one version for the whole batch, the last reported or (random) the next one
        assert len(versions) == 1 and versions <= {last_version, last_version + 1}
        assert log.locations("ctx2") == {}
        for res in log.read(locs.values()):
            assert res.ok and torch.equal(res.payload, make_record(res.location.chunk_index, res.location.version,
                                                                    **BIG).payload)
        segments_before = {p.name for p in log.segment_paths()}
        report = log.recover(["ctx"])
        referenced = {loc.segment for loc in locs.values()}
        assert {p.name for p in log.segment_paths()} == referenced
        if mode == "before_commit":
            assert report.files_removed == 1 and segments_before - referenced
        if mode == "mid_write":
            assert report.bytes_truncated > 0
        assert sum(p.stat().st_size for p in log.segment_paths()) == end_of(locs.values())
        assert all(r.ok for r in log.read(locs.values()))
        log.write("ctx", [make_record(8, **BIG)])  # and the log keeps working after recovery
        assert all(r.ok for r in log.read(log.locations("ctx").values()))


def test_recover_drops_dead_contexts_temp_files_and_orphans(log):
    log.write("alive", [make_record(0)])
    log.write("gone", [make_record(0), make_record(1)])
    (log.directory / "alive.99999999.seg.tmp").write_bytes(b"x" * 100)
    (log.directory / "orphan.00000777.seg").write_bytes(b"y" * 100)
    (log.directory / "notes.txt").write_text("not ours")
    report = log.recover(["alive"])
    assert report.rows_removed == 2 and report.files_removed == 3
    assert log.context_ids() == ["alive"]
    assert [p.name.split(".")[0] for p in log.segment_paths()] == ["alive"]
    assert (log.directory / "notes.txt").exists()


# -- corruption ------------------------------------------------------------------------------------------------------

def test_flipped_byte_fails_only_that_chunk_and_only_its_layers(log):
    records = [make_record(i) for i in range(4)]
    locs = log.write("ctx", records)
    victim = locs[2]
    flip_byte(log.directory / victim.segment, victim.section_offset(1) + 17)  # layer 1 of chunk 2
    results = log.read(locs)
    assert [r.fault for r in results] == [None, None, ChunkFault.CHECKSUM, None]
    assert results[2].payload is None
    assert all(r.ok for r in log.read(locs, 2, 2))  # layers 2-3 of the same chunk are intact and usable
    assert not log.read([victim], 0, 2)[0].ok
    assert log.stats().corrupt_chunks == 2 and log.stats().faults == {"section_checksum": 2}


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_a_read_in_batches_hands_over_verified_layers_and_drops_a_chunk_at_its_bad_layer(tmp_path, direct_io):
    """The restore's streaming read: batches of layers arrive in order while later ones are being read (several
    small requests on IO threads, which check what they land). A chunk corrupted in layer 3 is handed over for
    layers 0-1 (verified) and never after; its result carries the fault; every other chunk lands whole."""
    config = ChunkLogConfig(read_piece_bytes=8192, io_threads=3, direct_io=direct_io)
    records = [make_record(i, layers=6, section_bytes=1000 + 24 * i) for i in range(12)]
    log = ChunkLog(tmp_path / "kv", MODEL, CODEC, config=config)
    locs = log.write("ctx", records)
    assert all(r.ok for r in log.read(locs))  # headers now known: the IO threads check the sections
    flip_byte(log.directory / locs[5].segment, locs[5].section_offset(3) + 7)
    fresh = reopen(log)  # its reads parse the headers themselves: the caller's thread checks the sections
    for reader in (log, fresh):
        with reader:
            into = [torch.zeros(loc.n_layers * loc.section_bytes, dtype=torch.uint8) for loc in locs]
            batches = []
            results = reader.read(locs, into=into, on_layers=batches.append, layers_per_batch=2)
            assert [(b.first_layer, b.num_layers) for b in batches] == [(0, 2), (2, 2), (4, 2)]
            assert [5 in b.chunks for b in batches] == [True, False, False]
            assert all(sorted(b.chunks) == [i for i in range(12) if i != 5] for b in batches[1:])
            assert all(b.io_start_s <= b.io_end_s for b in batches)
            assert [r.fault for r in results] == [None] * 5 + [ChunkFault.CHECKSUM] + [None] * 6
            for i, (r, rec) in enumerate(zip(results, records, strict=True)):
                if i != 5:
                    assert r.payload is not None and torch.equal(r.payload, rec.payload)
                    assert r.payload.data_ptr() == into[i].data_ptr()  # read in place
            with pytest.raises(ValueError, match="needs `into`"):
                reader.read(locs, on_layers=batches.append)


def test_a_filesystem_without_direct_io_is_read_buffered(tmp_path):
    shm = Path("/dev/shm")
    if _fs_type(shm) != "tmpfs" or not os.access(shm, os.W_OK):
        pytest.skip("no writable tmpfs at /dev/shm (tmpfs refuses O_DIRECT: the case under test)")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as d, ChunkLog(Path(d) / "kv", MODEL, CODEC) as log:
        assert log.config.direct_io
        records = [make_record(i, layers=3) for i in range(5)]
        locs = log.write("ctx", records)
        results = log.read(locs)
        assert all(r.ok and torch.equal(r.payload, rec.payload) for r, rec in zip(results, records, strict=True))


def test_flipped_header_byte_is_detected(log):
    locs = log.write("ctx", [make_record(i) for i in range(3)])
    flip_byte(log.directory / locs[1].segment, locs[1].offset + 40)  # inside the version field
    assert [r.fault for r in log.read(locs)] == [None, ChunkFault.BAD_HEADER, None]


def test_truncated_and_deleted_segments_are_detected(log):
    locs = log.write("ctx", [make_record(i) for i in range(4)])
    path = log.directory / locs[0].segment
    os.truncate(path, locs[2].section_offset(3) + 1)  # inside chunk 2's last section
    with reopen(log) as fresh:  # no cached headers
        assert [r.fault for r in fresh.read(locs)] == [None, None, ChunkFault.TRUNCATED, ChunkFault.TRUNCATED]
        # layer 0 is all there, except for lone records where chunk 3 is wholly cut off
        expected = [True] * 4 if log.config.grouped else [True, True, True, False]
        assert [r.ok for r in fresh.read(locs, 0, 1)] == expected
    path.unlink()
    assert {r.fault for r in log.read(locs)} == {ChunkFault.MISSING}


@pytest.mark.parametrize(("kw", "fault"), [({"model_id": "other-model@ffff"}, ChunkFault.WRONG_MODEL),
                                           ({"codec_id": "int8-v2"}, ChunkFault.WRONG_CODEC)])
def test_records_of_another_model_or_codec_are_refused(log, kw, fault):
    locs = log.write("ctx", [make_record(i) for i in range(2)])
    with reopen(log, **kw) as other:
        assert [r.fault for r in other.read(locs)] == [fault, fault]
        assert other.stats().corrupt_chunks == 2


def test_wrong_format_version_and_mismatched_rows_are_refused(log):
    locs = log.write("ctx", [make_record(i) for i in range(3)])
    with open(log.directory / locs[0].segment, "r+b") as f:  # format version: bytes 8-9 of the header
        f.seek(locs[0].offset + 8)
        f.write((99).to_bytes(2, "little"))
    stale = replace(locs[1], version=locs[1].version + 1)  # a row that claims another version than the record holds
    other_prefix = replace(locs[2], prefix_hash=bytes(16))  # KV built for other tokens
    with reopen(log) as fresh:
        assert [r.fault for r in fresh.read([locs[0], stale, other_prefix])] == [
            ChunkFault.WRONG_FORMAT, ChunkFault.MISMATCH, ChunkFault.MISMATCH]


# -- compaction ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grouped", LAYOUTS)
def test_compaction_keeps_the_data_and_shrinks_the_files(tmp_path, grouped):
    config = ChunkLogConfig(grouped=grouped, compact_min_dead_bytes=0)
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=config) as log:
        log.write("ctx", [make_record(i) for i in range(6)])
        log.write("other", [make_record(i) for i in range(2)])
        live = sum(loc.record_bytes for loc in log.locations("ctx").values())
        log.write("ctx", [make_record(i, version=2) for i in (0, 2, 4)])  # dead = half of live: no compaction
        assert log.stats().compactions == 0
        stale = log.locations("ctx")
        log.write("ctx", [make_record(i, version=3) for i in range(1, 6)])  # now dead > live: compacted
        assert log.stats().compactions == 1
        locs = log.locations("ctx")
        assert [p.stat().st_size for p in log.segment_paths("ctx")] == [live]
        assert [loc.offset for loc in locs.values()] == sorted(loc.offset for loc in locs.values())  # chunk order
        for res in log.read(locs.values()):
            rec = make_record(res.location.chunk_index, res.location.version)
            assert res.ok and torch.equal(res.payload, rec.payload)
        # a reader holding locations from before the compaction is redirected when the version is still current
        results = log.read([stale[0], stale[1]])
        assert results[0].ok and results[0].location.segment == locs[0].segment
        assert results[1].fault is ChunkFault.MISSING  # version 1 of chunk 1 is gone for good
        assert log.compact("ctx") == 0  # already contiguous
        assert all(r.ok for r in log.read(log.locations("other").values()))


@pytest.mark.parametrize("grouped", LAYOUTS)
def test_compaction_drops_rows_whose_bytes_are_gone(tmp_path, grouped):
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=ChunkLogConfig(grouped=grouped)) as log:
        locs = log.write("ctx", [make_record(i) for i in range(4)])
        os.truncate(log.directory / locs[0].segment, locs[3].section_offset(3) + 10)
        log.compact("ctx")
        assert sorted(log.locations("ctx")) == [0, 1, 2]
        assert all(r.ok for r in log.read(log.locations("ctx").values()))
        assert log.stats().faults == {"truncated": 1}


def test_fragmented_contexts_are_regrouped(tmp_path):
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=ChunkLogConfig(compact_max_groups=3)) as log:
        for i in range(4):  # four write-backs, one chunk each: four groups
            log.write("ctx", [make_record(2 * i), make_record(2 * i + 1)])
        assert log.stats().compactions == 1
        locs = list(log.locations("ctx").values())
        assert {loc.group_offset for loc in locs} == {0} and len(log.segment_paths("ctx")) == 1
        log.read(locs, 0, 1)
        before = log.stats().read_requests
        assert all(r.ok for r in log.read(locs, 5 % 4, 1))
        assert log.stats().read_requests - before == 1


def test_a_failed_compaction_does_not_fail_the_committed_write(tmp_path, monkeypatch):
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, config=ChunkLogConfig(compact_min_dead_bytes=0)) as log:
        log.write("ctx", [make_record(i) for i in range(2)])
        log.write("ctx", [make_record(i, version=2) for i in range(2)])

        def disk_full(*args):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(log, "_rewrite", disk_full)
        locs = log.write("ctx", [make_record(i, version=3) for i in range(2)])  # dead > live: compaction fails
        assert log.stats().compaction_failures == 1 and log.stats().compactions == 0
        assert log.locations("ctx") == {loc.chunk_index: loc for loc in locs}
        assert len(log.segment_paths("ctx")) == 1 and all(r.ok for r in log.read(locs))
        monkeypatch.undo()
        log.write("ctx", [make_record(0, version=4)])
        assert log.stats().compactions == 1


# -- honesty, throttle, deletion, statistics -------------------------------------------------------------------------

def _fs_type(path: Path) -> str:
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype


def test_page_cache_holds_no_segment_pages_after_write_and_read(log):
    if _fs_type(log.directory) in ("tmpfs", "ramfs"):
        pytest.skip("a RAM filesystem keeps every page resident: nothing to drop")
    for v in range(1, 4):
        log.write("ctx", [make_record(i, version=v, layers=30, section_bytes=3840) for i in range(16)])
    paths = log.segment_paths()
    cached, total = cached_pages_all(paths)
    assert total > 100 and cached == 0
    locs = list(log.locations("ctx").values())
    for first, n in ((0, None), (7, 3)):
        assert all(r.ok for r in log.read(locs, first, n))
        assert cached_pages_all(paths) == (0, total)
    with open(paths[0], "rb") as f:  # the probe itself sees pages when they are there
        f.read()
    assert cached_pages(paths[0])[0] > 0


def test_throttle_limits_bandwidth_and_adds_latency(tmp_path):
    throttle = DiskThrottle.from_mb_s(20, latency_us=2000)
    assert throttle.describe() == "20 MB/s + 2000 us" and DiskThrottle().describe() == "unthrottled"
    assert DiskThrottle(latency_s=1e-4).describe() == "unlimited MB/s + 100 us"
    assert DiskThrottle.from_mb_s(200).describe() == "200 MB/s"
    with ChunkLog(tmp_path / "kv", MODEL, CODEC, throttle=throttle) as log:
        records = [make_record(i, layers=16, section_bytes=8192) for i in range(8)]  # ~1 MiB
        nbytes = sum(r.payload.numel() for r in records)
        t = time.monotonic()
        locs = log.write("ctx", records)
        assert time.monotonic() - t >= 0.8 * nbytes / 20e6
        t = time.monotonic()
        assert all(r.ok for r in log.read(locs))
        assert time.monotonic() - t >= 0.8 * nbytes / 20e6
        t = time.monotonic()
        for loc in locs:
            log.read([loc], 0, 1)
        assert time.monotonic() - t >= 0.8 * len(locs) * 2e-3  # latency paid per request
    with pytest.raises(ValueError):
        DiskThrottle(bandwidth_bytes_per_s=0)


def test_delete_context_removes_rows_and_files(log):
    log.write("a", [make_record(i) for i in range(3)])
    log.write("a", [make_record(1, version=2)])
    log.write("b", [make_record(0)])
    assert log.delete_context("a") == 3
    assert log.locations("a") == {} and log.segment_paths("a") == [] and log.context_ids() == ["b"]
    assert all(r.ok for r in log.read(log.locations("b").values()))
    assert log.delete_context("a") == 0


def test_statistics_count_bytes_and_records(log):
    records = [make_record(i) for i in range(3)]
    locs = log.write("ctx", records)
    log.read(locs)
    s = log.stats()
    assert s.records_written == 3 and s.write_requests == 1
    assert s.bytes_written == sum(loc.record_bytes for loc in locs)
    assert s.records_read == 3 and s.payload_bytes_read == sum(r.payload.numel() for r in records)
    assert s.bytes_read >= s.payload_bytes_read and s.corrupt_chunks == 0
    assert log.disk_bytes() == (s.bytes_written, s.bytes_written)
