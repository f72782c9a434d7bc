"""Replay one trace against one memory system (LLMS spec §9 "replay in compressed time", §1.3 metrics).

Owns a replay: every call of the trace, in order, runs through a fresh ChunkedKVStore with the given policy, budget,
chunk size and throttle, exactly as the service runs a context call. The steps are: acquire the context (the switch),
generate greedily up to the call's cap, close the turn and release. Calls run back to back on a simulated clock; the
trace's warm-up calls run but are not measured. Before each call the runner waits for the background writer, but no
longer than the call's virtual gap, so ahead-of-time write-back finishes whenever the real gap would have allowed it.
A call that would overflow the maximum context length starts the context afresh (the app opens a new conversation);
these are counted as resets.

Measured per call:
- switch: arrival until the KV is resident. The new prompt's prefill is excluded, and so is that of the previous
  turn's never-cached tail (its last token and closing tokens), which is new input like the prompt;
- TTFT: the switch, plus the prompt's prefill, plus the first token;
- call time;
- bytes read;
- recomputed tokens;
- the task score of the answer.

Ignores which systems and settings to run (llmaas.bench.switch) and reporting.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmaas.bench.kv_tasks import TASKS, score
from llmaas.bench.trace import Trace, TraceCall
from llmaas.engine.conversation import Conversation
from llmaas.engine.generate import GenerateRequest, Generator
from llmaas.kv.codec import ChunkGeometry
from llmaas.kv.spec import KVSpec
from llmaas.memory.policy import MemoryPolicy
from llmaas.memory.store import ChunkedKVStore, MemoryConfig
from llmaas.model.loader import LoadedModel
from llmaas.records import Message
from llmaas.restore.profiler import ensure_profile
from llmaas.storage.throttle import DiskThrottle


@dataclass(frozen=True)
class SystemSetting:
    """One system under one setting: everything a replay needs besides the model and the trace."""

    policy: MemoryPolicy
    budget_bytes: int
    max_context_tokens: int = 2048
    throttle: DiskThrottle | None = None


@dataclass
class CallRecord:
    context: str
    task: str
    is_switch: bool  # the context had KV before this call (its first call, or first after a reset, has none)
    hot: bool  # the working KV still held it (the previous call was to the same context)
    switch_s: float
    ttft_s: float
    call_s: float
    bytes_read: int
    recomputed_tokens: int
    answer: str
    score: float
    evictions: int = 0  # chunks reclaimed, or whole contexts killed or swapped out, to make room for this call


@dataclass
class ContextState:
    name: str
    generation: int = 0
    history: list[Message] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)

    @property
    def kv_id(self) -> str:
        return f"{self.name}#{self.generation}"

    def begin(self, conversation: Conversation, call: TraceCall,
              max_context_tokens: int) -> tuple[list[int] | None, int, str | None]:
        """A call's prompt ids and its turn's closing-token count. A call that would overflow the context starts it
        afresh, as its app would open a new conversation; the third value is then the old KV's id, for the caller to
        drop. The prompt is None when even a fresh context cannot hold the call (a short maximum length)."""
        prompt = conversation.prompt_ids(self.history, call.user, starts_context=not self.ids)
        closing = len(conversation.closing_ids(self.history, call.user, ""))
        dropped = None
        if self.ids and len(self.ids) + len(prompt) + call.max_new_tokens + closing > max_context_tokens:
            dropped = self.kv_id
            self.generation, self.history, self.ids = self.generation + 1, [], []
            prompt = conversation.prompt_ids([], call.user, starts_context=True)
        if len(prompt) + call.max_new_tokens + closing > max_context_tokens:
            return None, closing, dropped
        return prompt, closing, dropped


def replay(loaded: LoadedModel, trace: Trace, setting: SystemSetting, work_dir: Path | None = None,
           label: str = "") -> dict:
    """Run the trace through a fresh store; the system's metrics (JSON-ready) with its per-call records."""
    conversation = Conversation(loaded.tokenizer, loaded.chat_template)
    policy = setting.policy
    geometry = ChunkGeometry(KVSpec.from_config(loaded.config), policy.chunk_tokens)
    profile = None
    if policy.restore == "pipeline":
        from llmaas.paths import cache_dir

        profile = ensure_profile(loaded.model, geometry, loaded.model_id, cache_dir() / "profiles", setting.throttle,
                                 setting.max_context_tokens)
    with tempfile.TemporaryDirectory(prefix="llmaas-replay-", dir=work_dir) as tmp:
        store = ChunkedKVStore(loaded.model, MemoryConfig(policy, setting.budget_bytes, Path(tmp) / "kv",
                                                          loaded.model_id, setting.max_context_tokens,
                                                          setting.throttle), profile)
        try:
            records, resets, skipped, wall_s = _run(loaded, conversation, store, trace, setting, label)
            stats = store.log.stats()
            counters = dict(store.counters)
            peak = store.peak_resident_bytes
        finally:
            store.close()
    return summarize(records) | {
        "policy": policy.name, "budget_bytes": setting.budget_bytes, "max_resident_bytes": peak,
        "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
        "recomputed_tokens": counters.get("recomputed_tokens", 0), "faults": counters.get("faults", 0),
        "corrupt_chunks": counters.get("corrupt_chunks", 0), "waited_dirty": counters.get("waited_dirty", 0),
        "contexts_killed": counters.get("contexts_killed", 0), "resets": resets, "calls": len(records),
        "skipped_calls": skipped, "written_bytes_per_token": (stats.bytes_written / (stats.records_written
                                                                                     * policy.chunk_tokens)
                                                              if stats.records_written else None),
        "wall_s": wall_s, "records": [vars(r) for r in records],
    }


def _run(loaded: LoadedModel, conversation: Conversation, store: ChunkedKVStore, trace: Trace,
         setting: SystemSetting, label: str) -> tuple[list[CallRecord], int, int, float]:
    generator = Generator(loaded.model, loaded.tokenizer)
    contexts: dict[str, ContextState] = {}
    records: list[CallRecord] = []
    resets = skipped = 0
    started = last_report = time.perf_counter()
    for n, call in enumerate(trace.calls):
        ctx = contexts.setdefault(call.context, ContextState(call.context))
        prompt, closing, dropped = ctx.begin(conversation, call, setting.max_context_tokens)
        if dropped is not None:
            store.drop(dropped)
            resets += 1
        if prompt is None:
            skipped += 1
            continue
        store.writer.wait_idle(timeout_s=call.gap_s)  # the simulated gap: AoT gets what the real one would give
        read_before, recomputed_before = store.counters["bytes_read"], store.counters["recomputed_tokens"]
        evicted_before = _evictions(store)
        t0 = time.perf_counter()
        cache = store.acquire(ctx.kv_id, ctx.ids, len(ctx.ids) + len(prompt) + call.max_new_tokens + closing)
        acquired_s = time.perf_counter() - t0
        switch = store.last_switch
        assert switch is not None
        done = generator.generate(GenerateRequest(tuple(prompt), call.max_new_tokens), cache)
        new_ids, covered = conversation.close_turn(ctx.history, call.user, ctx.ids, prompt, done.token_ids,
                                                   done.text, cache.num_tokens)
        store.release(ctx.kv_id, new_ids[:covered])
        call_s = time.perf_counter() - t0
        if not call.warmup:
            records.append(CallRecord(call.context, call.task, bool(ctx.ids), switch.hot, switch.switch_s,
                                      acquired_s + done.timings.ttft_s, call_s,
                                      store.counters["bytes_read"] - read_before,
                                      store.counters["recomputed_tokens"] - recomputed_before, done.text,
                                      score(TASKS[call.task], done.text, call.gold),
                                      _evictions(store) - evicted_before))
        ctx.history += [Message("user", call.user), Message("assistant", done.text)]
        ctx.ids = new_ids
        store.check_budget()
        now = time.perf_counter()
        if now - last_report > 20 or n + 1 == len(trace.calls):
            last_report = now
            eta = (now - started) / (n + 1) * (len(trace.calls) - n - 1)
            print(f"    {label} call {n + 1}/{len(trace.calls)}, {now - started:.0f} s, ETA {eta:.0f} s",
                  file=sys.stderr, flush=True)
    return records, resets, skipped, time.perf_counter() - started


def _evictions(store: ChunkedKVStore) -> int:
    c = store.counters
    return c["reclaimed_chunks"] + c["contexts_killed"] + c["contexts_swapped_out"]


def pressure(records: list[CallRecord]) -> dict:
    """How much memory pressure the latencies were measured under: switches that had to bring KV back from outside
    memory (read from disk or recomputed: a restore), evictions, bytes read and tokens recomputed. A run in which no
    switch restored anything measured nothing of the memory system (every context was still resident), so it is
    flagged uninformative: its latencies must not be compared as if they were."""
    switches = [r for r in records if r.is_switch]
    restored = [r for r in switches if r.bytes_read or r.recomputed_tokens]
    return {"switches": len(switches), "restored_switches": len(restored),
            "restored_fraction": len(restored) / len(switches) if switches else 0.0,
            "evictions": sum(r.evictions for r in records), "bytes_read": sum(r.bytes_read for r in records),
            "recomputed_tokens": sum(r.recomputed_tokens for r in records), "informative": bool(restored)}


def summarize(records: list[CallRecord]) -> dict:
    """Switch latency over calls to a context that had KV (hot ones included: a switch to the context just used
    costs nothing, as on a phone), and over the cold ones alone; TTFT and call time over all calls; scores by task;
    the pressure the latencies were measured under."""
    switches = [r.switch_s for r in records if r.is_switch]
    cold = [r.switch_s for r in records if r.is_switch and not r.hot]
    by_task: dict[str, list[float]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r.score)
    return {"switch_s": latency(switches), "cold_switch_s": latency(cold),
            "ttft_s": latency([r.ttft_s for r in records]), "call_s": latency([r.call_s for r in records]),
            "accuracy": {t: statistics.fmean(v) for t, v in sorted(by_task.items())}, "pressure": pressure(records)}


def latency(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None, "n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"mean": statistics.fmean(values), "p50": statistics.median(values), "p99": p99, "n": len(values)}
