"""Which pending call runs next: FIFO within an app, round-robin across apps, bounded in total.

Owns fairness and back-pressure only: an app with a long backlog cannot starve another, and a full queue refuses new
work (the service answers 429 with Retry-After) instead of growing without bound. Ignores what a job is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

from llmaas.errors import LlmaasError

Job = TypeVar("Job")


class QueueFullError(LlmaasError):
    """Too many calls are waiting; retry later."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"the service is busy ({pending} calls waiting); retry shortly")
        self.pending = pending


class FairQueue(Generic[Job]):
    def __init__(self, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.max_pending = max_pending
        self._per_app: OrderedDict[int, deque[Job]] = OrderedDict()  # apps with work, in service order
        self._count = 0
        self._cv = threading.Condition()

    def __len__(self) -> int:
        with self._cv:
            return self._count

    def push(self, app_id: int, job: Job) -> None:
        with self._cv:
            if self._count >= self.max_pending:
                raise QueueFullError(self._count)
            self._per_app.setdefault(app_id, deque()).append(job)
            self._count += 1
            self._cv.notify()

    def pop(self, timeout_s: float) -> Job | None:
        """The next job (the app at the head of the rotation goes to its back), or None after timeout_s."""
        with self._cv:
            if not self._count and not self._cv.wait_for(lambda: self._count > 0, timeout_s):
                return None
            app_id, jobs = next(iter(self._per_app.items()))
            job = jobs.popleft()
            del self._per_app[app_id]
            if jobs:
                self._per_app[app_id] = jobs  # to the back of the rotation
            self._count -= 1
            return job
