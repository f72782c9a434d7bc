"""The engine: one compute thread that owns the model and runs calls one at a time.

The compute thread should be the thread that loaded the model (the service runs the loop on its main thread): each
thread that runs PyTorch ops gets its own OpenMP pool, and an idle second pool's spinning workers slowed decode by
~25% on 2 cores (measured).

The loop reads like a serving step: take the next call (fair across apps) -> make its context's KV resident (the
switch) -> generate, streaming deltas -> commit the turn durably -> acknowledge. Requests arrive through submit() with
their own sink for events (mlx-lm's server pattern); a Ticket lets the caller cancel, which the loop checks between
tokens. Ignores HTTP and authentication (the service layer), and how KV is kept (ContextKVStore).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llmaas.elastic.runtime import ElasticRuntime
from llmaas.engine.calls import (
    Call,
    CallDone,
    CallEvent,
    CallFailed,
    CallParams,
    CallResult,
    CallTimings,
    ChatCall,
    ChooseCall,
    ChooseDone,
    ChooseResult,
    ContextCall,
    EmbedCall,
    EmbedDone,
    EmbedResult,
    EmbedTimings,
    WindowReport,
)
from llmaas.engine.conversation import Conversation, common_prefix
from llmaas.engine.generate import Finished, GenerateRequest, Generator, TextDelta
from llmaas.engine.scheduler import FairQueue
from llmaas.engine.window import Window, fit
from llmaas.errors import (
    CallCancelled,
    ContextLengthError,
    ElasticUnavailableError,
    LlmaasError,
    NotFoundError,
    ShuttingDownError,
)
from llmaas.kv.codec import ChunkGeometry
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.memory.policy import POLICIES, MemoryPolicy
from llmaas.memory.store import ChunkedKVStore, MemoryConfig, Residency
from llmaas.model.loader import LoadedModel
from llmaas.model.transformer import DEFAULT_PREFILL_CHUNK_TOKENS
from llmaas.records import App, ContextRecord, Message
from llmaas.restore.profiler import ensure_profile
from llmaas.storage.catalog import Catalog
from llmaas.storage.faults import DiskFaults
from llmaas.storage.throttle import DiskThrottle

log = logging.getLogger("llmaas.engine")
STREAM_FLUSH_S = 0.025
DEFAULT_BUDGET_CONTEXTS = 2  # LLMS §7: end-to-end runs default to a budget of two maximum-length INT8 contexts
Sink = Callable[[CallEvent], None]


class Ticket:
    """A submitted call: cancel() stops it at the next token (and nothing of it is committed)."""

    def __init__(self, call: Call, sink: Sink) -> None:
        self.call, self.sink = call, sink
        self.submitted_s = time.perf_counter()
        self.started_s = self.submitted_s  # set when the compute thread takes it
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(frozen=True)
class EngineConfig:
    kv_budget_bytes: int | None = None  # None: room for DEFAULT_BUDGET_CONTEXTS maximum-length contexts
    max_pending: int = 64  # calls one app may have waiting, unless the app sets its own bound
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    memory: MemoryPolicy = POLICIES["llms"]
    max_context_tokens: int = 2048  # the service's maximum context length (LLMS §1.2); app quotas are capped by it
    kv_dir: Path | None = None  # None: "kv" beside the catalogue
    throttle: DiskThrottle | None = None  # emulate slower flash (a study option; off by default)
    faults: DiskFaults | None = None  # injected chunk write/fsync errors (the reliability check's seam; off)

    def __post_init__(self) -> None:
        if (self.kv_budget_bytes is not None and self.kv_budget_bytes < 0) or self.max_pending < 1 \
                or self.prefill_chunk_tokens < 1 or self.max_context_tokens < 1:
            raise ValueError("kv_budget_bytes >= 0, max_pending >= 1, prefill_chunk_tokens >= 1 and "
                             "max_context_tokens >= 1 are required")

    def budget_bytes(self, spec: KVSpec) -> int:
        if self.kv_budget_bytes is not None:
            return self.kv_budget_bytes
        geometry = ChunkGeometry(spec, self.memory.chunk_tokens)
        one = ChunkedKVStore.minimum_budget_bytes(geometry, self.memory, self.max_context_tokens)
        return DEFAULT_BUDGET_CONTEXTS * one


NO_ELASTIC = ElasticUnavailableError("this service runs without elastic sub-models; its operator starts it with "
                                     "`llmaas serve --elastic` (after building them with `llmaas elastic prepare`)")


class Engine:
    def __init__(self, loaded: LoadedModel, catalog: Catalog, config: EngineConfig = EngineConfig(),
                 elastic: ElasticRuntime | ElasticUnavailableError = NO_ELASTIC) -> None:
        """`elastic`: the runtime for calls with an SLO (over `loaded`, reordered), or why there is none."""
        self.loaded, self.catalog, self.config, self.elastic = loaded, catalog, config, elastic
        self.conversation = Conversation(loaded.tokenizer, loaded.chat_template)
        self.generator = Generator(loaded.model, loaded.tokenizer, config.prefill_chunk_tokens)
        self.kv = open_kv_store(loaded, catalog, config)
        self.queue: FairQueue[Ticket] = FairQueue(config.max_pending)
        self.counters = _new_counters()
        self._app_counters: defaultdict[int, dict[str, int]] = defaultdict(_new_counters)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._current: Ticket | None = None

    # -- lifecycle and submission (any thread) ----------------------------------------------------------------------

    def run(self) -> None:
        """Serve calls on the calling thread until stop()."""
        self._loop()

    def start(self) -> Engine:
        """Serve calls on a new background thread."""
        self._thread = threading.Thread(target=self._loop, name="llmaas-compute", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the call in flight is cancelled (nothing of it is saved) and queued calls are refused."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancel()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def close(self) -> None:
        """After stop(): finish the background KV write-back and close the chunk store."""
        self.kv.close()

    def submit(self, call: Call, sink: Sink) -> Ticket:
        """Queue a call; raises QueueFullError when its app already has its bound of calls waiting."""
        ticket = Ticket(call, sink)
        self.queue.push(call.app.id, ticket, call.app.max_pending)
        return ticket

    def forget_context(self, context_id: str) -> None:
        """The context was deleted: drop its KV (a call in flight on it will find it gone and commit nothing)."""
        self.kv.drop(context_id)

    def forget_removed(self) -> list[str]:
        """Drop the KV (memory and disk) of every context the catalogue no longer holds, e.g. after `llmaas apps
        remove` from another process; returns their ids."""
        live = self.catalog.all_context_ids()
        gone = sorted(self.kv.context_ids() - live)
        for context_id in gone:
            self.kv.drop(context_id)
        return gone

    def residency(self) -> dict[str, Residency]:
        """Each context with KV in memory: its resident bytes, cached tokens and whether a call holds it."""
        return {r.context_id: r for r in self.kv.usage()}

    def context_limit(self, app: App) -> int:
        """The most tokens one of the app's contexts may hold: its quota, capped by the service and the model."""
        return min(app.max_context_tokens, self.loaded.config.context_length, self.config.max_context_tokens)

    def app_stats(self, app: App) -> dict[str, int]:
        """What one app may see of the engine: its own calls and queue, never other apps' or global figures."""
        return {"queue_pending": self.queue.pending(app.id),
                "queue_limit": app.max_pending or self.queue.max_pending_per_app,
                "max_context_tokens": self.context_limit(app), **self._app_counters[app.id]}

    def stats(self) -> dict[str, int]:
        """Global figures, for the operator: the queue, the KV budget and store, and every call's counters."""
        return {"queue_pending": len(self.queue), "queue_limit_per_app": self.queue.max_pending_per_app,
                "kv_resident_bytes": self.kv.resident_bytes, "kv_budget_bytes": self.kv.budget_bytes,
                "recomputed_tokens": self.kv.recomputed_tokens, "max_context_tokens": self.config.max_context_tokens,
                "kv_reclaimed_chunks": self.kv.counters["reclaimed_chunks"],
                "kv_dirty_reclaim_waits": self.kv.counters["waited_dirty"],  # reclaims that waited for a write-back
                "kv_write_failures": self.kv.writer.failures + self.kv.counters["unwritten_evictions"],
                "kv_corrupt_chunks": self.kv.counters["corrupt_chunks"],
                "kv_injected_disk_faults": self.kv.log.faults.injected,  # serve --inject-disk-faults (a test seam)
                **self.counters}

    # -- the compute thread --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            ticket = self.queue.pop(timeout_s=0.1)
            if ticket is not None:
                self._current = ticket
                self._serve(ticket)
                self._current = None
        while (ticket := self.queue.pop(timeout_s=0)) is not None:
            ticket.sink(CallFailed(ShuttingDownError("the service is shutting down; retry when it is back")))

    def _serve(self, ticket: Ticket) -> None:
        ticket.started_s = time.perf_counter()
        try:
            if ticket.cancelled:
                raise CallCancelled("the call was cancelled before it started")
            if isinstance(ticket.call, EmbedCall):
                embedded = self._run_embed_call(ticket)
                self._count(ticket, "calls")
                ticket.sink(EmbedDone(embedded))
                return
            if isinstance(ticket.call, ChooseCall):
                chosen = self._run_choose_call(ticket)
                self._count(ticket, "calls")
                ticket.sink(ChooseDone(chosen))
                return
            run = self._run_context_call if isinstance(ticket.call, ContextCall) else self._run_chat_call
            result = run(ticket)
            self._count(ticket, "calls", "generated_tokens", result.completion_tokens)
            self._log_call(ticket, result)
            ticket.sink(CallDone(result))
        except CallCancelled as exc:
            self._count(ticket, "cancelled")
            ticket.sink(CallFailed(exc))
        except LlmaasError as exc:
            self._count(ticket, "failed")
            ticket.sink(CallFailed(exc))
        except Exception as exc:  # a bug: report it to the caller and keep serving everyone else
            log.exception("call failed")
            self._count(ticket, "failed")
            ticket.sink(CallFailed(LlmaasError(f"internal error: {type(exc).__name__}: {exc}")))

    def _count(self, ticket: Ticket, outcome: str, tokens_key: str | None = None, tokens: int = 0) -> None:
        for counters in (self.counters, self._app_counters[ticket.call.app.id]):
            counters[outcome] += 1
            if tokens_key is not None:
                counters[tokens_key] += tokens

    def _run_context_call(self, ticket: Ticket) -> CallResult:
        call: ContextCall = ticket.call  # type: ignore[assignment]
        started = time.perf_counter()
        ctx = self.catalog.get_context(call.app.id, call.context_id)
        if ctx is None:
            raise NotFoundError(f"no context {call.context_id!r}")
        base = list(ctx.token_ids)
        prompt = self.conversation.prompt_ids(ctx.messages, call.prompt, starts_context=not base)
        closing_reserve = len(self.conversation.closing_ids(ctx.messages, call.prompt, ""))
        w = Window(base, prompt, 0, 0)
        if ctx.overflow == "window":
            limit = self.context_limit(call.app)
            # the sinks are the first chunk, so that chunk's KV survives every slide; a tiny limit keeps fewer
            w = fit(base, prompt, limit, call.params.max_tokens, closing_reserve,
                    min(self.kv.policy.chunk_tokens, limit // 4))
        max_tokens = self._room(call.app, w.retained_tokens + closing_reserve, call.params)
        try:
            cache = self.kv.acquire(ctx.id, w.held, w.retained_tokens + max_tokens + closing_reserve)
            switch_s = time.perf_counter() - started
            done = self._generate(ticket, w.prompt, max_tokens, cache)
            new_ids, covered = self._close_turn(ctx, call.prompt, w.held, w.prompt, done, cache)
            committed = self.catalog.commit_turn(call.app.id, ctx.id, len(base), call.prompt, done.text, new_ids,
                                                 w.dropped_tokens)
        except BaseException:
            # Roll the KV back to the committed context: what the working KV holds of it (after a slide, the sinks
            # and whatever else both windows share).
            self.kv.release(ctx.id, base[:common_prefix(base, w.held)])
            raise
        if not committed:
            # Deleted during the call: drop marks it (the call still holds its chunks) and release, which ends the
            # call, forgets it. Without the release its KV stayed resident and unreclaimable for good (found by the
            # concurrency campaign: the budget filled and every later call failed).
            self.kv.drop(ctx.id)
            self.kv.release(ctx.id, ())
            raise NotFoundError(f"context {ctx.id!r} was deleted during the call; nothing was saved")
        self.kv.release(ctx.id, new_ids[:covered])
        if w.dropped_tokens:
            self._count(ticket, "window_slides", "window_dropped_tokens", w.dropped_tokens)
        result = self._result(ticket, ctx.id, done, len(w.prompt), len(new_ids), switch_s,
                              context_full=max_tokens < call.params.max_tokens and ctx.overflow == "error")
        if not w.dropped_tokens:
            return result
        return replace(result, window=WindowReport(w.dropped_tokens, w.truncated_prompt_tokens,
                                                   ctx.dropped_tokens + w.dropped_tokens))

    def _run_chat_call(self, ticket: Ticket) -> CallResult:
        call: ChatCall = ticket.call  # type: ignore[assignment]
        if call.slo is not None:
            return self._run_elastic_chat(ticket)
        prompt = self.conversation.chat_ids(call.messages)
        max_tokens = self._room(call.app, len(prompt), call.params)
        cache = DenseKVCache(self.kv.spec, len(prompt) + max_tokens)
        done = self._generate(ticket, prompt, max_tokens, cache)
        return self._result(ticket, None, done, len(prompt), 0, 0.0)

    def _runtime(self) -> ElasticRuntime:
        if isinstance(self.elastic, ElasticUnavailableError):
            raise self.elastic
        return self.elastic

    def _run_elastic_chat(self, ticket: Ticket) -> CallResult:
        """A stateless chat under an SLO: the first system message is the refinable context, the last user message
        the query the tiny LM reads with it; every other message is read whole."""
        call: ChatCall = ticket.call  # type: ignore[assignment]
        runtime = self._runtime()
        started = time.perf_counter()
        system = next((i for i, m in enumerate(call.messages) if m.role == "system"), None)
        context = call.messages[system].content if system is not None else ""
        query = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
        whole = self.conversation.chat_ids(call.messages)
        plan = runtime.plan(context, query, len(whole) - runtime.count_tokens(context), call.slo)  # type: ignore
        messages = list(call.messages)
        if system is not None:
            messages[system] = Message("system", plan.compressed.text)
        prompt = self.conversation.chat_ids(messages)
        max_tokens = self._room(call.app, len(prompt), call.params)
        cache = DenseKVCache(self.kv.spec, len(prompt) + max_tokens)
        planned_s = time.perf_counter() - started
        done = self._generate(ticket, prompt, max_tokens, cache,
                              runtime.generator(plan.config.m, self.config.prefill_chunk_tokens))
        t = done.timings
        tpot = t.decode_s / (t.generated_tokens - 1) if t.generated_tokens > 1 else None
        result = self._result(ticket, None, done, len(prompt), 0, 0.0, planned_s=planned_s)
        return replace(result, elastic=plan.report(planned_s + t.ttft_s, tpot))

    def _run_choose_call(self, ticket: Ticket) -> ChooseResult:
        call: ChooseCall = ticket.call  # type: ignore[assignment]
        out = self._runtime().choose(call.context, call.question, list(call.choices), call.slo)
        prompt_tokens = out.plan.compressed.tokens + out.plan.query_tokens
        return ChooseResult(out.choice, tuple(out.scores), prompt_tokens, out.plan.report(out.ttft_s, None),
                            ticket.started_s - ticket.submitted_s, time.perf_counter() - ticket.submitted_s)

    def _run_embed_call(self, ticket: Ticket) -> EmbedResult:
        """Embed the texts with the tiny LM, here on the compute thread (one PyTorch thread pool for both models),
        loading it on the service's first embedding call. The work is bounded by the request limits (texts per call,
        tokens per text), so it is not cancellable midway."""
        call: EmbedCall = ticket.call  # type: ignore[assignment]
        started = time.perf_counter()
        embedder = call.tiny_lm.get()
        loaded = time.perf_counter()
        out = embedder.embed(call.texts)
        done = time.perf_counter()
        timings = EmbedTimings(ticket.started_s - ticket.submitted_s, loaded - started, done - loaded,
                               done - ticket.submitted_s)
        return EmbedResult(out.vectors, out.num_tokens, timings)

    def _room(self, app: App, used_tokens: int, params: CallParams) -> int:
        """How many tokens the reply may have: the request's max_tokens, capped by the context limit."""
        limit = self.context_limit(app)
        room = limit - used_tokens
        if room < 1:
            raise ContextLengthError(
                f"the context would need {used_tokens} tokens before the reply, over its limit of {limit}; "
                "start a new context or send a shorter prompt"
            )
        return min(params.max_tokens, room)

    def _generate(self, ticket: Ticket, prompt: list[int], max_tokens: int, cache: DenseKVCache,
                  generator: Generator | None = None) -> Finished:
        """Run the generation, streaming text to the sink: the first piece at once, then at most one piece per
        STREAM_FLUSH_S (each piece wakes the HTTP thread, which competes with the compute threads for the 2 cores:
        per-token delivery cost ~8% of decode speed, measured)."""
        request = GenerateRequest(tuple(prompt), max_tokens, ticket.call.params.sampling, ticket.call.params.stop)
        stream = (generator or self.generator).stream(request, cache)
        pending, flushed_s = "", 0.0
        try:
            for event in stream:
                if ticket.cancelled:
                    raise CallCancelled("the caller went away; the call was stopped and nothing was saved")
                if isinstance(event, Finished):
                    if pending:
                        ticket.sink(TextDelta(pending, event.token_ids[-1]))
                    return event
                pending += event.text
                now = time.perf_counter()
                if pending and now - flushed_s >= STREAM_FLUSH_S:
                    ticket.sink(TextDelta(pending, event.token_id))
                    pending, flushed_s = "", now
        finally:
            stream.close()
        raise AssertionError("generation ended without a Finished event")

    def _close_turn(self, ctx: ContextRecord, user: str, base: list[int], prompt: list[int], done: Finished,
                    cache: DenseKVCache) -> tuple[list[int], int]:
        """The context's ids after this turn, and how many of them the cache already covers."""
        return self.conversation.close_turn(ctx.messages, user, base, prompt, done.token_ids, done.text,
                                            cache.num_tokens)

    def _result(self, ticket: Ticket, context_id: str | None, done: Finished, prompt_tokens: int,
                context_tokens: int, switch_s: float, context_full: bool = False, planned_s: float = 0.0) -> CallResult:
        """The call's result; a reply cut because the context ran out of room (not by the caller's max_tokens)
        finishes with "context_full", which the caller must tell apart: its next call would be refused. planned_s:
        an elastic call's decision (tiny LM and compression), which comes before the first token."""
        t = done.timings
        queue_s = ticket.started_s - ticket.submitted_s
        timings = CallTimings(queue_s, switch_s, t.prefill_s, queue_s + switch_s + planned_s + t.ttft_s,
                              t.decode_tok_s,
                              time.perf_counter() - ticket.submitted_s)
        reason = "context_full" if context_full and done.finish_reason == "length" else done.finish_reason
        return CallResult(context_id, done.text, reason, prompt_tokens, len(done.token_ids), context_tokens, timings)

    def _log_call(self, ticket: Ticket, r: CallResult) -> None:
        t = r.timings
        log.info("call", extra={"fields": {
            "app": ticket.call.app.name, "context": r.context_id, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "context_tokens": r.context_tokens,
            "finish_reason": r.finish_reason, "queue_s": round(t.queue_s, 4), "switch_s": round(t.switch_s, 4),
            "prefill_s": round(t.prefill_s, 4), "ttft_s": round(t.ttft_s, 4), "decode_tok_s": round(t.decode_tok_s, 1),
            "total_s": round(t.total_s, 4), "kv_resident_bytes": self.kv.resident_bytes,
        }})



def _new_counters() -> dict[str, int]:
    return {"calls": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0, "window_slides": 0,
            "window_dropped_tokens": 0}


def open_kv_store(loaded: LoadedModel, catalog: Catalog, config: EngineConfig) -> ChunkedKVStore:
    """The context-KV store for this policy, its restore profile measured once (LLMS §5.3) and stale state cleaned."""
    kv_dir = config.kv_dir if config.kv_dir is not None else catalog.path.parent / "kv"
    policy = config.memory
    spec = KVSpec.from_config(loaded.config)
    memory = MemoryConfig(policy, config.budget_bytes(spec), kv_dir, loaded.model_id, config.max_context_tokens,
                          config.throttle, config.prefill_chunk_tokens, config.faults)
    profile = None
    if policy.restore == "pipeline":
        profile = ensure_profile(loaded.model, ChunkGeometry(spec, policy.chunk_tokens), loaded.model_id,
                                 kv_dir / "profiles", config.throttle, config.max_context_tokens)
    store = ChunkedKVStore(loaded.model, memory, profile)
    store.recover(catalog.all_context_ids())
    return store
