"""`llmaas serve` as a child process: started on a data directory, waited for until it answers, and stopped.

Owns the process's life from outside (the demo, the service benchmark and the tests that kill a real service use it):
a child that dies or does not answer in time is reported, and one interrupted while starting is never left behind.
Ignores what the service does (server.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from llmaas.client import Client, ServiceError
from llmaas.errors import ServiceStartError
from llmaas.paths import DataDir


def start_service(home: DataDir, extra: list[str], timeout_s: float = 300.0) -> subprocess.Popen:
    """`llmaas serve` in a child process, returned once it answers on its socket."""
    proc = subprocess.Popen([sys.executable, "-m", "llmaas", "serve", "--home", str(home.root), "--quiet", *extra])
    try:
        _wait_ready(proc, home, timeout_s)
    except BaseException:  # also Ctrl-C while the model loads: never leave a service behind on a directory
        stop_service(proc)
        raise
    return proc


def _wait_ready(proc: subprocess.Popen, home: DataDir, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceStartError(f"the service exited with code {proc.returncode} while starting; see its log in "
                                    f"{home.log_dir}")
        try:
            Client("probe", socket=home.socket).list()
        except ServiceError as exc:
            if exc.status == 401:  # it answers (and refuses the probe key): ready
                return
        time.sleep(0.2)
    raise ServiceStartError(f"the service did not answer within {timeout_s:.0f} s; see its log in {home.log_dir}")


def stop_service(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM (the service commits and closes cleanly), then SIGKILL if it has not gone within timeout_s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
