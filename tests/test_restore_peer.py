"""The restore benchmark's disk probe (small sizes) and llama.cpp peer (skipped where llama_cpp is not installed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest

from llmaas.bench.disk import (
    DiskBandwidth,
    FloorProbe,
    drop_from_page_cache,
    measure_disk,
    read_into,
    resident_fraction,
)


def test_measure_disk_small(tmp_path):
    d = measure_disk(tmp_path, file_bytes=2 * 2**20, random_request_bytes=64 * 1024, random_requests=8, repeats=2)
    assert isinstance(d, DiskBandwidth)
    assert d.seq_read_bytes_per_s > 0 and d.random_read_bytes_per_s > 0 and d.write_bytes_per_s > 0
    assert len(d.seq_read_s_all) == 2
    assert 0 < d.random_latency_s <= d.random_latency_p90_s
    assert d.resident_after_drop is None or 0 <= d.resident_after_drop <= 1
    assert "MB/s" in d.describe() and "64 KiB" in d.describe()
    assert d.to_json()["random_requests"] == 8
    assert list(tmp_path.iterdir()) == []  # the probe file is removed
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.repeats = 3  # type: ignore[misc]


def test_measure_disk_rejects_too_small_file(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        measure_disk(tmp_path, file_bytes=1024, random_request_bytes=1024, random_requests=2)


def test_read_into_and_drop(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(300_000)
    path.write_bytes(data)
    drop_from_page_cache(path)  # must not lose or change data
    frac = resident_fraction(path)
    assert frac is None or 0 <= frac <= 1
    buf = bytearray(len(data))
    assert read_into(path, buf) == len(data)
    assert bytes(buf) == data


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed (peers)")
def test_llama_cpp_restore_peer(tmp_path):
    from llmaas.bench.restore_peer import measure_restore_peer
    from llmaas.errors import ModelFileError
    from llmaas.paths import default_model_path

    try:
        default_model_path()
    except ModelFileError as exc:
        pytest.skip(str(exc))
    ids = [(17 * i + 100) % 4000 + 200 for i in range(64)]
    r = measure_restore_peer(ids, tmp_path, repeats=2)
    assert r["logits_match"] is True and r["logits_max_abs_diff"] == 0.0
    assert r["tokens"] == 64 and len(r["load_s_all"]) == 2
    assert r["bytes"] >= 64 * 23_040  # SmolLM2 fp16 KV: 23,040 B/token, plus a header
    assert r["load_s"] > 0 and r["save_s"] > 0
    assert list(tmp_path.iterdir()) == []


def test_floor_probe_reads_cold_and_cleans_up(tmp_path):
    with FloorProbe(tmp_path, 3 * 2**20 + 5) as probe:
        assert probe.path.stat().st_size == 3 * 2**20 + 5
        assert all(probe.read_s() > 0 for _ in range(2))
        frac = resident_fraction(probe.path)
        assert frac is None or frac > 0.5  # the read itself brought the file in; the next read_s drops it first
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="at least one byte"):
        FloorProbe(tmp_path, 0)


def test_bench_restore_reports_the_cold_and_the_hot_switch_on_each_decode_path(tmp_path, kernels):
    """`bench restore` end to end on a short context: the cold switch against its floor, and the hot switch's
    decode on the path asked for (AVX-512 skipped where the CPU lacks it), named in the JSON."""
    import json

    from llmaas.bench import restore

    try:
        for isa in ("avx2", "avx512"):
            out = tmp_path / f"{isa}.json"
            try:
                code = restore.main(["--tokens", "64", "--repeats", "1", "--kv-decode", isa, "--dir",
                                     str(tmp_path / isa), "--json", str(out)])
            except SystemExit as exc:  # this CPU lacks the path: said, not measured
                assert isa == "avx512" and "AVX-512" in str(exc)
                continue
            assert code == 0
            result = json.loads(out.read_text())
            assert result["config"]["kv_decode"] == isa
            ours = result["ours"]
            assert ours["bytes_read"] > 0 and ours["switch_s"] > 0 and ours["floor_s"] > 0
            assert 0 < ours["resident_decode_s"] < ours["switch_s"]
    finally:
        kernels.set_kv_decode_isa("auto")
