"""`--threads auto`: as many compute threads as the cores other processes leave idle, re-decided while serving.

Owns the choice of this process's compute thread count under contention. An on-device service shares the CPU with
apps: with one thread per core, one other busy process made every parallel region wait for the thread that shares its
core, and decode fell from 143 to 40 tok/s, where one thread kept 96 (Zen 4, 2 cores, measured; docs/ENGINE.md).
So the governor samples /proc/stat and this process's own CPU time at most every `interval_s`, estimates how many
cores the other processes keep busy, and sets torch's thread count (which the native kernels follow) to the rest,
at least one. Thread count does not change results: every kernel and GEMM sums each output in one fixed order.
Ignores what runs on the threads; callers tick() it between steps (the generator per chunk and per token).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU time, in clock ticks: all cores' busy and total time, and this process's own."""

    busy_ticks: int
    total_ticks: int
    own_ticks: int


def read_sample() -> CpuSample:
    """From /proc/stat's first line (user nice system idle iowait irq softirq steal ...) and /proc/self/stat
    (utime and stime: fields 14 and 15)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return CpuSample(sum(fields) - idle, sum(fields), int(own[11]) + int(own[12]))


class ThreadGovernor:
    """Keeps torch's thread count at the cores others leave free (see the module docstring)."""

    def __init__(self, cores: int | None = None, interval_s: float = 0.5,
                 sample: Callable[[], CpuSample] = read_sample, clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self.interval_s = interval_s
        self._sample, self._clock, self._set = sample, clock, set_threads
        self._last = sample()
        self._last_s = clock()
        self.threads = self.cores
        self.others_busy_cores = 0.0
        self._set(self.threads)

    def tick(self) -> int:
        """Re-decide if interval_s has passed since the last decision; returns the thread count in force."""
        now = self._clock()
        if now - self._last_s < self.interval_s:
            return self.threads
        cur = self._sample()
        total = cur.total_ticks - self._last.total_ticks
        if total > 0:
            others = (cur.busy_ticks - self._last.busy_ticks) - (cur.own_ticks - self._last.own_ticks)
            self.others_busy_cores = max(0.0, others / total * self.cores)
            threads = max(1, self.cores - round(self.others_busy_cores))
            if threads != self.threads:
                self.threads = threads
                self._set(threads)
        self._last, self._last_s = cur, now
        return self.threads


_active: ThreadGovernor | None = None


def install(governor: ThreadGovernor | None) -> None:
    """Make `governor` the process's (torch's thread count is process-wide, so there is one); None removes it."""
    global _active
    _active = governor


def tick() -> None:
    """Let the installed governor re-decide (no-op without one): call between compute steps."""
    if _active is not None:
        _active.tick()


def apply_threads(threads: int | str | None) -> None:
    """Apply a --threads value: AUTO installs a governor, a count fixes torch's threads, None leaves torch's default
    (one per core)."""
    if threads == AUTO:
        install(ThreadGovernor())
    elif threads is not None:
        install(None)
        torch.set_num_threads(int(threads))

