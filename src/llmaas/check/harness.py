"""The pieces every reliability campaign shares: a service on a throw-away data directory, progress, percentiles.

Owns the service's life as the campaigns need it (start, stop, `kill -9`, restart on the same directory), the apps
registered straight in its catalogue, and reading the process's RSS, threads and open descriptors from /proc.
Ignores what each campaign checks.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmaas.client import Client
from llmaas.paths import DataDir
from llmaas.service.process import start_service, stop_service
from llmaas.storage.catalog import Catalog

START_TIMEOUT_S = 120.0


class ServiceUnderTest:
    """One `llmaas serve` on a temporary data directory, with apps added to its catalogue before it starts."""

    def __init__(self, flags: list[str], apps: list[str], prefix: str = "llmaas-check-",
                 root: Path | None = None) -> None:
        """root: the data directory (default: a new temporary one), e.g. on a mount the campaign made."""
        self.home = DataDir(root if root is not None else Path(tempfile.mkdtemp(prefix=prefix))).create()
        self.flags = flags
        catalog = Catalog(self.home.catalog)
        try:
            self.keys = {name: catalog.add_app(name)[1] for name in apps}
        finally:
            catalog.close()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_service(self.home, self.flags, timeout_s=START_TIMEOUT_S)

    def client(self, app: str, timeout_s: float = 120.0) -> Client:
        return Client(self.keys[app], socket=self.home.socket, timeout_s=timeout_s)

    def engine_stats(self, timeout_s: float = 60.0) -> dict:
        """The engine's global figures, as the operator sees them (the Unix socket without a key)."""
        transport = httpx.HTTPTransport(uds=str(self.home.socket))
        with httpx.Client(transport=transport, base_url="http://llmaas", timeout=timeout_s) as h:
            r = h.get("/v1/stats")
            r.raise_for_status()
            return r.json()["engine"]

    def kill9(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: nothing in the service gets to run."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                stop_service(self.proc)
            self.proc = None

    def close(self) -> None:
        """Stop the service and delete its data directory."""
        self.stop()
        shutil.rmtree(self.home.root, ignore_errors=True)

    def proc_figures(self) -> dict[str, int]:
        """RSS bytes, threads and open file descriptors of the service process (Linux /proc)."""
        assert self.proc is not None
        return read_proc_figures(self.proc.pid)


def read_proc_figures(pid: int) -> dict[str, int]:
    figures = {"rss_bytes": 0, "threads": 0, "fds": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            figures["rss_bytes"] = int(value.split()[0]) * 1024  # the kernel reports kB
        elif key == "Threads":
            figures["threads"] = int(value)
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Progress:
    """Progress lines on stderr with an ETA from the mean time per finished step."""

    def __init__(self, campaign: str, total: int) -> None:
        self.campaign, self.total, self.t0 = campaign, max(total, 1), time.monotonic()

    def step(self, done: int, note: str = "") -> None:
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - done) if done else math.nan
        eta_text = "?" if math.isnan(eta) else f"{eta:.0f} s"
        suffix = f" {note}" if note else ""
        print(f"check {self.campaign}: {done}/{self.total} ({elapsed:.0f} s, ETA {eta_text}){suffix}",
              file=sys.stderr, flush=True)

