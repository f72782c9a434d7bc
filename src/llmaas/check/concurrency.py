"""The concurrency campaign: many apps forcing reclaim of dirty chunks behind a stalled writer, while other threads
delete and recreate the contexts being called, and poll stats, as fast as they can.

Owns the load and the judgement. The service runs the LLMS store with ahead-of-time write-back (`llms-no-pipeline`:
the same ledger, sealing and writer as `llms`, restore by reading, so no restore profile is measured at start) under
the smallest KV budget it accepts for two 512-token contexts, and its chunk IO throttled to a few MB/s: the stalled
writer (the throttle is the service's own disk-speed seam, `serve --disk-throttle-mbps`). Every call leaves dirty
chunks that the writer lags behind on, so the next app's switch must reclaim chunks whose write is still queued and
wait for it (counted by the service: `kv_dirty_reclaim_waits`). Meanwhile a deleter thread deletes a context some
app is calling (the same context) or not (a different one) and recreates it, and a stats thread reads every app's
stats, context lists and the operator's engine figures.

Judged: exceptions (a 5xx answer, an internal error in a call, or an exception in the service's log), deadlocks (a
watchdog: the operator's stats must answer within WATCHDOG_S, and every thread must finish within its deadline),
and budget violations (resident KV bytes over the budget in any stats sample). Documented answers are not errors:
404 for a context deleted under the call, 429 for a full queue. Ignores exactness (the crash campaign) and latency
(the soak).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field

import httpx

from llmaas.check.harness import Progress, ServiceUnderTest
from llmaas.client import CallReply, Client, ServiceError

APPS = [f"busy-{i}" for i in range(4)]
CONTEXTS_PER_APP = 2
MAX_CONTEXT_TOKENS = 512
KV_BUDGET_MB = 12.2  # the smallest the service accepts for two 512-token INT8 contexts (soak.py): 8 contexts share it
THROTTLE_MB_S = 1.0  # ~2 MB of dirty chunks per call: the writer falls seconds behind the calls
FLAGS = ["--threads", "1", "--kv-policy", "llms-no-pipeline", "--max-context-tokens", str(MAX_CONTEXT_TOKENS),
         "--kv-budget-mb", str(KV_BUDGET_MB), "--disk-throttle-mbps", str(THROTTLE_MB_S)]
MAX_TOKENS = 8
WATCHDOG_S = 60.0  # the operator's stats must answer within this, whatever the engine is doing
EXPECTED = (404, 429)  # a context deleted under the call; a full queue
WORDS = ["tide", "moss", "iron", "lark", "fern", "dune"]


@dataclass
class Tally:
    calls: int = 0
    deletes: int = 0
    stats_reads: int = 0
    expected_refusals: int = 0
    exceptions: list[str] = field(default_factory=list)
    deadlocks: list[str] = field(default_factory=list)
    budget_violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, text: str) -> None:
        with self.lock:
            bucket = getattr(self, kind)
            if len(bucket) < 100:
                bucket.append(text)


class Contexts:
    """The ids of each app's contexts, shared by its caller and the deleter."""

    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def pick(self, app: str, rng: random.Random) -> tuple[int, str]:
        with self.lock:
            slot = rng.randrange(len(self.ids[app]))
            return slot, self.ids[app][slot]

    def replace(self, app: str, slot: int, old: str, new: str) -> None:
        with self.lock:
            if self.ids[app][slot] == old:
                self.ids[app][slot] = new


def run_concurrency(duration_s: float, seed: int = 0) -> dict:
    sut = ServiceUnderTest(FLAGS, APPS, prefix="llmaas-busy-")
    tally, contexts = Tally(), Contexts()
    stop = threading.Event()
    try:
        sut.start()
        for app in APPS:
            with sut.client(app) as c:
                contexts.ids[app] = [c.new_context() for _ in range(CONTEXTS_PER_APP)]
        rng = random.Random(seed)
        threads = [threading.Thread(target=_caller, args=(sut, app, contexts, tally, stop, rng.random()), daemon=True)
                   for app in APPS]
        threads += [threading.Thread(target=_deleter, args=(sut, contexts, tally, stop, rng.random()), daemon=True),
                    threading.Thread(target=_stats_reader, args=(sut, contexts, tally, stop), daemon=True)]
        for t in threads:
            t.start()
        progress = Progress("concurrency", int(duration_s))
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration_s:
            time.sleep(min(10.0, duration_s - elapsed))
            progress.step(int(time.monotonic() - t0), f"calls {tally.calls}, deletes {tally.deletes}, exceptions "
                                                      f"{len(tally.exceptions)}, deadlocks {len(tally.deadlocks)}")
        stop.set()
        for t in threads:
            t.join(timeout=WATCHDOG_S + 300)  # a call in flight finishes first (a few seconds behind the writer)
            if t.is_alive():
                tally.add("deadlocks", f"thread {t.name} still running {WATCHDOG_S + 300:.0f} s after the stop")
        engine = sut.engine_stats()
        log_errors = _logged_exceptions(sut)
        for line in log_errors:
            tally.add("exceptions", f"service log: {line}")
        alive = sut.is_alive()
        if not alive:
            tally.add("exceptions", "the service process died")
    finally:
        stop.set()
        sut.close()
    return {"duration_s": duration_s, "calls": tally.calls, "deletes": tally.deletes, "stats_reads": tally.stats_reads,
            "expected_refusals": tally.expected_refusals,
            "dirty_reclaim_waits": engine["kv_dirty_reclaim_waits"], "reclaimed_chunks": engine["kv_reclaimed_chunks"],
            "exceptions": len(tally.exceptions), "deadlocks": len(tally.deadlocks),
            "budget_violations": len(tally.budget_violations),
            "failing": [*tally.exceptions, *tally.deadlocks, *tally.budget_violations][:30]}


def _caller(sut: ServiceUnderTest, app: str, contexts: Contexts, tally: Tally, stop: threading.Event,
            seed: float) -> None:
    rng = random.Random(seed)
    with Client(sut.keys[app], socket=sut.home.socket, timeout_s=WATCHDOG_S + 240) as c:
        i = 0
        while not stop.is_set():
            i += 1
            _, ctx = contexts.pick(app, rng)
            prompt = f"Call {i} of {app}: " + " ".join(rng.choice(WORDS) for _ in range(150))
            try:
                if rng.random() < 0.5:
                    c.call(ctx, prompt, max_tokens=MAX_TOKENS, temperature=0)
                else:  # streamed: read to its end (the reply, or the error event that raises)
                    next(p for p in c.stream(ctx, prompt, max_tokens=MAX_TOKENS, temperature=0)
                         if isinstance(p, CallReply))
                with tally.lock:
                    tally.calls += 1
            except ServiceError as exc:
                _judge(exc, f"{app} call {i}", tally)


def _deleter(sut: ServiceUnderTest, contexts: Contexts, tally: Tally, stop: threading.Event, seed: float) -> None:
    """Delete a context (often one a call is running on: the callers pick among two) and put a new one in its slot."""
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.2, 2.0)):
        app = rng.choice(APPS)
        slot, ctx = contexts.pick(app, rng)
        with sut.client(app, timeout_s=WATCHDOG_S) as c:
            try:
                c.delete(ctx)
                new = c.new_context()
            except ServiceError as exc:
                _judge(exc, f"{app} delete", tally)
                continue
        contexts.replace(app, slot, ctx, new)
        with tally.lock:
            tally.deletes += 1


def _stats_reader(sut: ServiceUnderTest, contexts: Contexts, tally: Tally, stop: threading.Event) -> None:
    """Every app's stats and context list, and the operator's figures, in a loop; the budget checked each time."""
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            engine = sut.engine_stats(timeout_s=WATCHDOG_S)
        except (httpx.HTTPError, ServiceError) as exc:
            tally.add("deadlocks" if isinstance(exc, httpx.TimeoutException) else "exceptions",
                      f"operator stats: {type(exc).__name__}: {exc}")
            continue
        if time.monotonic() - t0 > WATCHDOG_S:
            tally.add("deadlocks", f"operator stats took {time.monotonic() - t0:.0f} s")
        if engine["kv_resident_bytes"] > engine["kv_budget_bytes"]:
            tally.add("budget_violations", f"{engine['kv_resident_bytes']} resident bytes over the budget of "
                                           f"{engine['kv_budget_bytes']}")
        for app in APPS:
            with sut.client(app, timeout_s=WATCHDOG_S) as c:
                try:
                    c.stats()
                    c.list()
                except ServiceError as exc:
                    _judge(exc, f"{app} stats", tally)
        with tally.lock:
            tally.stats_reads += 1
        time.sleep(0.05)


def _judge(exc: ServiceError, what: str, tally: Tally) -> None:
    if exc.status in EXPECTED:
        with tally.lock:
            tally.expected_refusals += 1
    elif exc.status == 503 and "cannot reach" in str(exc):
        tally.add("deadlocks", f"{what}: {exc}")  # the client's timeout or a dead service
    else:
        tally.add("exceptions", f"{what}: {exc}")


def _logged_exceptions(sut: ServiceUnderTest) -> list[str]:
    """Records of the service's log that carry an exception (a bug caught and logged, e.g. a failed write-back)."""
    found = []
    for path in sorted(sut.home.log_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "exception" in record or record.get("level") in ("error", "critical"):
                found.append(f"{record.get('event')}: {str(record.get('exception', ''))[-300:]}")
    return found
