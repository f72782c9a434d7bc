"""Disk throttle: emulate slower flash for chunk reads and writes (LLMS §7, a simulation option, off by default).

Owns the settings (`DiskThrottle`, frozen) and the shared limiter (`ThrottleLimiter`, a token bucket). A request is
held until it could have finished on the emulated disk: a fixed latency per request plus its bytes at the set
bandwidth, the bandwidth shared by all threads. Ignores what is read or written; never speeds real IO up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Up to this much transfer time may be "saved up" while the disk idles, as a real device absorbs a short burst.
DEFAULT_BURST_S = 0.002


@dataclass(frozen=True)
class DiskThrottle:
    bandwidth_bytes_per_s: float | None = None  # None: no bandwidth limit
    latency_s: float = 0.0  # added to every request
    burst_s: float = DEFAULT_BURST_S

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"throttle bandwidth must be > 0 bytes/s (or None), got {self.bandwidth_bytes_per_s}")
        if self.latency_s < 0 or self.burst_s < 0:
            raise ValueError("throttle latency_s and burst_s must be >= 0")

    @classmethod
    def from_mb_s(cls, mb_per_s: float | None, latency_us: float = 0.0) -> DiskThrottle:
        """MB = 10^6 bytes, as disk vendors count (the spec's sweep: 1000, 200 and 50 MB/s)."""
        return cls(None if mb_per_s is None else mb_per_s * 1e6, latency_us * 1e-6)

    @property
    def is_enabled(self) -> bool:
        return self.bandwidth_bytes_per_s is not None or self.latency_s > 0

    def describe(self) -> str:
        """For reports: 'unthrottled', '200 MB/s + 100 us', '50 MB/s' or 'unlimited MB/s + 500 us'."""
        if not self.is_enabled:
            return "unthrottled"
        bandwidth = "unlimited" if self.bandwidth_bytes_per_s is None else f"{self.bandwidth_bytes_per_s / 1e6:g}"
        latency = f" + {self.latency_s * 1e6:g} us" if self.latency_s > 0 else ""
        return f"{bandwidth} MB/s{latency}"

    def limiter(self) -> ThrottleLimiter:
        return ThrottleLimiter(self)


class ThrottleLimiter:
    """Thread-safe: `with limiter.request(nbytes): <do the IO>`; the exit sleeps until the emulated completion time."""

    def __init__(self, config: DiskThrottle) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._bucket_free_at = 0.0  # monotonic time at which the emulated disk has moved every byte granted so far
        self.requests = 0
        self.slept_s = 0.0

    def reserve(self, nbytes: int) -> float:
        """Book `nbytes` on the shared bandwidth; returns the monotonic time before which the request may not end."""
        now = time.monotonic()
        cfg = self.config
        transfer_end = now
        if cfg.bandwidth_bytes_per_s is not None:
            with self._lock:
                # Token bucket of depth burst_s: idle time beyond it is not saved up.
                start = max(self._bucket_free_at, now - cfg.burst_s)
                self._bucket_free_at = start + nbytes / cfg.bandwidth_bytes_per_s
                transfer_end = self._bucket_free_at
        # Latency is per request (never paid from the burst credit) and overlaps between concurrent requests.
        return max(now, transfer_end) + cfg.latency_s

    def wait_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        with self._lock:
            self.requests += 1
            self.slept_s += max(0.0, delay)
        if delay > 0:
            time.sleep(delay)

    @contextmanager
    def request(self, nbytes: int) -> Iterator[None]:
        if not self.config.is_enabled:
            yield
            return
        deadline = self.reserve(nbytes)
        yield
        self.wait_until(deadline)
