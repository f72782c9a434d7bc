"""How much of a file the OS page cache holds: mmap + mincore(2) through ctypes (Linux).

Owns the honesty check of LLMS §7 ("no hidden RAM tier"): swapped chunk files must have 0 resident pages. Ignores
what the files contain; mapping a file and asking mincore faults nothing in, so the probe does not disturb the cache.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_pages(path: str | Path) -> tuple[int, int]:
    """(pages of `path` resident in the page cache, pages in the file). An empty file is (0, 0)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        total = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {path} failed: {os.strerror(err)}")
        try:
            vec = (ctypes.c_ubyte * total)()
            if _libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore of {path} failed: {os.strerror(err)}")
            # The low bit of each byte is 'resident'; the others are reserved and zero.
            return total - bytes(vec).count(0), total
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def cached_pages_all(paths: Iterable[str | Path]) -> tuple[int, int]:
    """Sums of `cached_pages` over several files."""
    cached = total = 0
    for p in paths:
        c, t = cached_pages(p)
        cached += c
        total += t
    return cached, total
