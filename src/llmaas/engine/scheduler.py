"""Which pending call runs next: FIFO within an app, round-robin across apps, each app's backlog bounded.

Owns fairness and back-pressure only: an app with a long backlog cannot starve another, and an app whose backlog is
full is refused (the service answers 429 with Retry-After) instead of the queue growing without bound. The bound is
per app, so one app's burst can never refuse another app's calls. Ignores what a job is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

from llmaas.errors import LlmaasError

Job = TypeVar("Job")


class QueueFullError(LlmaasError):
    """The app has too many calls waiting; retry later."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"this app already has {pending} calls waiting, its limit; retry shortly")
        self.pending = pending


class FairQueue(Generic[Job]):
    def __init__(self, max_pending_per_app: int) -> None:
        if max_pending_per_app < 1:
            raise ValueError("max_pending_per_app must be >= 1")
        self.max_pending_per_app = max_pending_per_app  # for apps that do not set their own bound
        self._per_app: OrderedDict[int, deque[Job]] = OrderedDict()  # apps with work, in service order
        self._count = 0
        self._cv = threading.Condition()

    def __len__(self) -> int:
        with self._cv:
            return self._count

    def pending(self, app_id: int) -> int:
        with self._cv:
            return len(self._per_app.get(app_id, ()))

    def push(self, app_id: int, job: Job, limit: int | None = None) -> None:
        """Queue a job for an app; raises QueueFullError when the app already has `limit` (default: the queue's
        per-app bound) jobs waiting."""
        limit = self.max_pending_per_app if limit is None else limit
        with self._cv:
            jobs = self._per_app.get(app_id)
            if jobs is not None and len(jobs) >= limit:
                raise QueueFullError(len(jobs))
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
