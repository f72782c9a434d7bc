"""The ahead-of-time write-back thread: chunk writes that run after a call's reply, off the critical path.

Owns one background thread and a FIFO of jobs; `wait_idle()` lets a Reclaim that found only dirty victims (or a
benchmark replaying a trace gap) wait for the writes in flight. Ignores what a job writes: the store builds each job
(snapshot of payloads, commit into the chunk log, marking chunks clean under its own lock).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("llmaas.memory")


class WriteBack:
    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self.busy_s = 0.0  # total time spent writing
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="llmaas-writeback", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
        self._jobs.put(job)

    @property
    def pending(self) -> int:
        with self._idle:
            return self._pending

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted job has finished; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        """Finish the queued writes, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            t0 = time.perf_counter()
            try:
                job()
            except Exception:  # the chunks stay dirty and are written again on eviction; the service keeps going
                self.failures += 1
                log.exception("ahead-of-time write-back failed")
            self.busy_s += time.perf_counter() - t0
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
