"""Injected disk faults: the chunk log's test seam for the reliability check (`serve --inject-disk-faults RATE`).

Owns the settings (`DiskFaults`, frozen) and the seeded draw that decides, per append, whether the write or the fsync
after it fails with EIO, as a failing flash device would answer. The chunk log raises the error at the real call
site, so everything above it (clean-up of the partial append, the write-back's retry, eviction, the caller's
answer) runs as it would on a bad disk. Off by default and never meant for production; ignores reads (corrupt and
missing bytes on the read side are injected into the files themselves by the check).
"""

from __future__ import annotations

import errno
import random
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class DiskFaults:
    write_error_rate: float = 0.0  # an append fails before writing a byte
    fsync_error_rate: float = 0.0  # an append's bytes are written, then its fsync fails
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.write_error_rate <= 1 and 0 <= self.fsync_error_rate <= 1):
            raise ValueError("injected fault rates must lie in [0, 1]")

    def injector(self) -> FaultInjector:
        return FaultInjector(self)


class FaultInjector:
    """Thread-safe: `check("write")` / `check("fsync")` raise OSError(EIO) at the configured rate."""

    def __init__(self, config: DiskFaults) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self.injected = 0

    def check(self, what: str) -> None:
        rate = self.config.write_error_rate if what == "write" else self.config.fsync_error_rate
        if rate <= 0:
            return
        with self._lock:
            fail = self._rng.random() < rate
            self.injected += fail
        if fail:
            raise OSError(errno.EIO, f"injected {what} error (serve --inject-disk-faults)")
