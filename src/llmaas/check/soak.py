"""The soak campaign: many apps calling at once for a while, under a KV budget that forces eviction.

Owns the load and what it measures: N app threads, each making M calls (plain, every fourth streamed, short greedy
replies) over two contexts of its own, replaced by fresh ones when near full; the service's KV budget is the smallest
it accepts for two contexts, so most calls switch contexts through eviction, write-back and restore. Measured:
client-side latency p50/p99, errors other than the documented 429 (counted apart, and retried after `Retry-After`),
and the service process's RSS, open descriptors and threads after a warm-up and at the end. A time limit bounds the
full plan. Ignores reply quality and exactness (the crash campaign owns those).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from llmaas.check.harness import Progress, ServiceUnderTest, percentile
from llmaas.client import CallReply, Client, ServiceError

MAX_CONTEXT_TOKENS = 512
# INT8 KV (the default llms policy) is 24.25 MiB per 2048 tokens, so 512 tokens take ~6.1 MiB: 12.2 MiB is about the
# smallest budget the service accepts for two 512-token contexts, and every app holds two contexts.
KV_BUDGET_MB = 12.2
MAX_TOKENS = 8
ROLLOVER_MARGIN_TOKENS = 64


@dataclass
class SoakTally:
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    throttled: int = 0  # documented 429s
    calls: int = 0
    slowest: list[tuple[float, str, dict]] = field(default_factory=list)  # (latency, what, service timings)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, latency_s: float | None, error: str | None = None) -> None:
        with self.lock:
            if latency_s is not None:
                self.calls += 1
                self.latencies_s.append(latency_s)
            if error is not None and len(self.errors) < 1000:
                self.errors.append(error)


def summarize(latencies_s: list[float]) -> dict[str, float]:
    """p50 and p99 in seconds (NaN when there were none)."""
    return {"p50_s": percentile(latencies_s, 50), "p99_s": percentile(latencies_s, 99)}


def run_soak(apps: int, calls_per_app: int, time_limit_s: float) -> dict:
    names = [f"soak-{i}" for i in range(apps)]
    # one compute thread: on a shared 2-core machine two torch threads spin against any other load and a call
    # then takes seconds instead of 0.2 s (seen here); the soak is about leaks and errors, not peak speed
    flags = ["--threads", "1", "--max-context-tokens", str(MAX_CONTEXT_TOKENS), "--kv-budget-mb", str(KV_BUDGET_MB)]
    sut = ServiceUnderTest(flags, names, prefix="llmaas-soak-")
    tally = SoakTally()
    try:
        sut.start()
        with sut.client(names[0]) as c:  # warm-up: the first call pays one-time costs (threads, arenas, kernels)
            ctx = c.new_context()
            c.call(ctx, "Hello.", max_tokens=MAX_TOKENS, temperature=0)
            c.delete(ctx)
        before = sut.proc_figures()
        deadline = time.monotonic() + time_limit_s
        progress = Progress("soak", apps * calls_per_app)
        threads = [threading.Thread(target=_app_loop, args=(sut, name, calls_per_app, deadline, tally), daemon=True)
                   for name in names]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            next(t for t in threads if t.is_alive()).join(timeout=10)  # a progress line every 10 s at most
            progress.step(tally.calls, f"errors {len(tally.errors)}, 429s {tally.throttled}")
        after = sut.proc_figures()
        alive = sut.is_alive()
    finally:
        sut.close()
    return {"apps": apps, "calls": tally.calls, "errors": len(tally.errors) + (0 if alive else 1),
            "throttled_429": tally.throttled, **summarize(tally.latencies_s),
            "rss_growth_bytes": after["rss_bytes"] - before["rss_bytes"], "fd_growth": after["fds"] - before["fds"],
            "thread_growth": after["threads"] - before["threads"], "before": before, "after": after,
            "time_limited": time.monotonic() >= deadline, "error_samples": tally.errors[:20],
            "slowest": [{"latency_s": lat, "call": what, "timings": t} for lat, what, t in tally.slowest]}


def _app_loop(sut: ServiceUnderTest, app: str, calls: int, deadline: float, tally: SoakTally) -> None:
    with Client(sut.keys[app], socket=sut.home.socket, timeout_s=300) as c:
        contexts = [c.new_context(), c.new_context()]
        for i in range(calls):
            if time.monotonic() >= deadline:
                return
            slot = i % 2
            t0 = time.perf_counter()
            try:
                reply = _one_call(c, contexts[slot], f"Call {i} of {app}: name a colour.", streamed=i % 4 == 3)
            except ServiceError as exc:
                if exc.status == 429:
                    with tally.lock:
                        tally.throttled += 1
                    time.sleep(1.0)  # what Retry-After asks; the call is not counted as made
                    continue
                tally.add(None, f"{app} call {i}: {exc}")
                continue
            latency_s = time.perf_counter() - t0
            tally.add(latency_s)
            with tally.lock:  # the slowest calls' own timings say where the time went (queue, switch, compute)
                tally.slowest = sorted([*tally.slowest, (latency_s, f"{app} call {i}", reply.timings)],
                                       key=lambda x: -x[0])[:5]
            if reply.usage["context_tokens"] + ROLLOVER_MARGIN_TOKENS > MAX_CONTEXT_TOKENS:
                c.delete(contexts[slot])  # a near-full context is replaced, as a real app would start a new one
                contexts[slot] = c.new_context()


def _one_call(c: Client, ctx: str, prompt: str, streamed: bool) -> CallReply:
    if not streamed:
        return c.call(ctx, prompt, max_tokens=MAX_TOKENS, temperature=0)
    return next(p for p in c.stream(ctx, prompt, max_tokens=MAX_TOKENS, temperature=0) if isinstance(p, CallReply))
