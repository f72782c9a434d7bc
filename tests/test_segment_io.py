"""Low-level reads of the chunk log: the scattering preadv over iovec arrays, and the native landing and checksum
loops against their pure-Python fallbacks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from llmaas.storage.chunk_record import checksum_section, section_seeds
from llmaas.storage.native import CHECKSUM, DESTINATION, LENGTH, SEED, SLOT, SOURCE, land_pieces, verify_checksums
from llmaas.storage.segment_io import aligned_empty, iovecs, preadv_iov, split


def test_preadv_iov_scatters_in_order_and_stops_at_the_end_of_the_file(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    parts = [np.zeros(n, dtype=np.uint8) for n in (100, 3000, 1, 9000)]  # the last runs past the end of the file
    iov = np.concatenate([iovecs(p.ctypes.data, p.size) for p in parts])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert preadv_iov(fd, iov, 50) == len(data) - 50
        assert preadv_iov(fd, iovecs(parts[0].ctypes.data, 10), len(data)) == 0
    finally:
        os.close(fd)
    got = np.concatenate(parts)[:len(data) - 50].tobytes()
    assert got == data[50:]
    assert iov[3, 1] == 9000  # the caller's iovecs are left as they were
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        preadv_iov(0, np.zeros(4, dtype=np.uint64), 0)


def test_split_and_aligned_buffers():
    assert split(0, 10, 1 << 20) == [(0, 10)]
    pieces = split(4096, 5 * 2**20 + 3, 1 << 20)
    assert pieces[0][0] == 4096 and sum(n for _, n in pieces) == 5 * 2**20 + 3
    assert all(off % 4096 == 0 for off, _ in pieces) and len(pieces) == 6
    assert all(aligned_empty(n).ctypes.data % 4096 == 0 for n in (1, 4097, 3 << 20))


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_landing_checks_then_copies_and_verification_flags_the_bad_section(native, request):
    if native:
        request.getfixturevalue("kernels")
    rng = np.random.default_rng(3)
    sizes = [700, 4096, 1, 3000, 513]
    src = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    dst = [np.zeros(n, dtype=np.uint8) for n in sizes]
    seeds = section_seeds(2, len(sizes))
    sums = np.array([checksum_section(memoryview(s), 2 + k) for k, s in enumerate(src)], dtype=np.uint64)
    sums[3] ^= np.uint64(1)  # section 3 does not match its checksum
    table = np.zeros((6, len(sizes)), dtype=np.int64)
    table[SOURCE] = [s.ctypes.data for s in src]
    table[DESTINATION] = [d.ctypes.data for d in dst]
    table[DESTINATION, 4] = table[SOURCE, 4]  # already in place: checked, not copied
    table[LENGTH] = sizes
    table[SEED], table[CHECKSUM] = seeds.view(np.int64), sums.view(np.int64)
    table[SLOT] = [0, 1, -1, 3, 4]  # piece 2 is not checked (its checksum was not known)
    state = np.zeros(6, dtype=np.uint8)
    land_pieces(table, state, use_kernels=native)
    assert state.tolist() == [1, 1, 0, 2, 1, 0]
    assert all(np.array_equal(d, s) for d, s in list(zip(dst, src, strict=True))[:4])
    assert not dst[4].any()
    ok = verify_checksums(table[SOURCE], table[LENGTH], seeds, sums, use_kernels=native)
    assert ok.tolist() == [True, True, True, False, True]
