"""The chunk log's hot loop over thousands of small pieces, in native code where it builds: landing what a read
request brought in (check each section's checksum, copy it to its chunk's buffer), or only checking checksums.

Owns the dispatch: the native kernels (llmaas.kernels, GIL released) when this machine builds them, else the same
work in Python (one ctypes call per piece, a few times slower), so results never depend on which ran. Ignores what
the pieces are (chunk_log.py and chunk_record.py say).
"""

from __future__ import annotations

import ctypes
import functools
from types import ModuleType

import numpy as np
import torch
import xxhash

_MASK64 = (1 << 64) - 1  # seeds and checksums are 64-bit unsigned, stored in int64 columns

@functools.cache
def _kernels() -> ModuleType | None:
    from llmaas.errors import KernelBuildError
    from llmaas.kernels import load_kernels

    try:
        kernels = load_kernels()
    except KernelBuildError:
        return None
    return kernels if hasattr(kernels, "land_pieces") else None


# Rows of a landing table (int64 [6, m], one column per piece).
SOURCE, DESTINATION, LENGTH, SEED, CHECKSUM, SLOT = range(6)


def land_pieces(table: np.ndarray, state: np.ndarray, *, use_kernels: bool = True) -> None:
    """For each piece (a column of `table`): when SLOT >= 0, check the XXH3-64 (seed SEED) of the LENGTH bytes at
    SOURCE against CHECKSUM and set state.flat[SLOT] to 1 (good) or 2 (bad); then copy them to DESTINATION when it
    differs from SOURCE. The caller keeps every address alive; no two pieces overlap; state is contiguous uint8."""
    table = np.ascontiguousarray(table, dtype=np.int64)
    kernels = _kernels() if use_kernels else None
    if kernels is not None:
        kernels.land_pieces(torch.from_numpy(table), torch.from_numpy(state.reshape(-1)))
        return
    flat = state.reshape(-1)
    digest = xxhash.xxh3_64_intdigest
    for src, dst, n, seed, want, slot in table.T.tolist():
        if slot >= 0:
            got = digest(memoryview((ctypes.c_char * n).from_address(src)), seed & _MASK64)
            flat[slot] = 1 if got == want & _MASK64 else 2
        if dst != src:
            ctypes.memmove(dst, src, n)


def verify_checksums(addresses: np.ndarray, lengths: np.ndarray, seeds: np.ndarray, checksums: np.ndarray, *,
                     use_kernels: bool = True) -> np.ndarray:
    """bool [n]: whether the lengths[k] bytes at addresses[k] have the XXH3-64 checksum checksums[k] with seed
    seeds[k] (seeds and checksums uint64; the caller keeps every address alive). A landing that copies nothing."""
    n = len(addresses)
    table = np.empty((6, n), dtype=np.int64)
    table[SOURCE] = table[DESTINATION] = addresses
    table[LENGTH] = lengths
    table[SEED] = np.asarray(seeds, dtype=np.uint64).view(np.int64)
    table[CHECKSUM] = np.asarray(checksums, dtype=np.uint64).view(np.int64)
    table[SLOT] = np.arange(n)
    state = np.zeros(n, dtype=np.uint8)
    land_pieces(table, state, use_kernels=use_kernels)
    return state == 1
