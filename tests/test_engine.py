"""The engine below the HTTP layer: a context whose KV is dropped after every call and rebuilt by recompute from its
stored token ids continues exactly like one whose KV never left memory."""

from __future__ import annotations

import queue

from llmaas.engine.calls import CallDone, CallFailed, CallParams, ContextCall
from llmaas.engine.worker import Engine, EngineConfig
from llmaas.memory.policy import POLICIES
from llmaas.storage.catalog import Catalog

CONVERSATIONS = [("You are helpful.", ["Tell me about the moon.", "And the sun?", "Which is bigger?"]),
                 ("Answer briefly.", ["List three animals.", "Which is the fastest?", "Why?"])]


def converse(engine: Engine, catalog: Catalog, app, system: str, turns: list[str], after_call=None) -> list[str]:
    ctx = catalog.create_context(app, system)
    replies = []
    for turn in turns:
        events: queue.Queue = queue.Queue()
        engine.submit(ContextCall(app, ctx.id, turn, CallParams(max_tokens=24)), events.put)
        while not isinstance(event := events.get(timeout=120), CallDone | CallFailed):
            pass
        assert isinstance(event, CallDone), event
        replies.append(event.result.reply)
        if after_call is not None:
            after_call()
    return replies


def test_recomputed_contexts_continue_like_never_evicted_ones(tmp_path, smollm):
    catalog = Catalog(tmp_path / "c.sqlite3")
    app, _ = catalog.add_app("x", max_contexts=10)
    lmk = POLICIES["lmk"]
    kept = Engine(smollm, catalog, EngineConfig(kv_budget_bytes=2**30, memory=lmk, kv_dir=tmp_path / "kv1")).start()
    evicted = Engine(smollm, catalog, EngineConfig(memory=lmk, kv_dir=tmp_path / "kv2")).start()
    try:
        for system, turns in CONVERSATIONS:
            drop_all = lambda: evicted.kv.reclaim(evicted.kv.budget_bytes)  # noqa: E731  (kill every context)
            want = converse(kept, catalog, app, system, turns)
            assert want == converse(evicted, catalog, app, system, turns, after_call=drop_all)
        assert evicted.kv.recomputed_tokens > 100 and evicted.kv.resident_bytes == 0
        assert kept.kv.resident_bytes > 0
    finally:
        for engine in (kept, evicted):
            engine.stop()
            engine.close()
        catalog.close()


def test_stopping_cancels_the_call_in_flight_and_refuses_the_queue(tmp_path, smollm):
    from llmaas.errors import CallCancelled, ShuttingDownError

    catalog = Catalog(tmp_path / "c.sqlite3")
    app, _ = catalog.add_app("x")
    engine = Engine(smollm, catalog, EngineConfig(kv_dir=tmp_path / "kv")).start()
    long_ctx, queued_ctx = catalog.create_context(app, None), catalog.create_context(app, None)
    running: queue.Queue = queue.Queue()
    waiting: queue.Queue = queue.Queue()
    engine.submit(ContextCall(app, long_ctx.id, "Write a long story.", CallParams(max_tokens=2000)), running.put)
    engine.submit(ContextCall(app, queued_ctx.id, "hi", CallParams(max_tokens=4)), waiting.put)
    running.get(timeout=60)  # the first call is generating
    engine.stop()
    while not isinstance(event := running.get(timeout=30), CallFailed):
        pass
    assert isinstance(event.error, CallCancelled)
    assert isinstance(waiting.get(timeout=30).error, ShuttingDownError)
    assert catalog.get_context(app.id, long_ctx.id).num_calls == 0  # nothing of the cancelled call was saved
    catalog.close()


def test_a_context_deleted_during_its_call_leaves_no_kv_behind(tmp_path, smollm):
    """Found by the concurrency campaign: a context deleted while its call ran kept its chunks resident and locked
    for good, so under a tight budget every later call failed. Its KV must leave memory with the call."""
    catalog = Catalog(tmp_path / "c.sqlite3")
    app, _ = catalog.add_app("x")
    engine = Engine(smollm, catalog, EngineConfig(kv_dir=tmp_path / "kv")).start()
    try:
        ctx = catalog.create_context(app, None)
        first: queue.Queue = queue.Queue()
        engine.submit(ContextCall(app, ctx.id, "Tell me about the sea.", CallParams(max_tokens=16)), first.put)
        while not isinstance(first.get(timeout=60), CallDone):
            pass
        assert engine.kv.resident_bytes > 0  # the first turn's chunks are resident
        events: queue.Queue = queue.Queue()
        engine.submit(ContextCall(app, ctx.id, "Write a long story.", CallParams(max_tokens=200)), events.put)
        events.get(timeout=60)  # generating: its chunks are held by the call
        assert catalog.delete_context(app.id, ctx.id)  # what DELETE /v1/contexts/{id} does
        engine.forget_context(ctx.id)
        while not isinstance(event := events.get(timeout=60), CallDone | CallFailed):
            pass
        assert isinstance(event, CallFailed) and "deleted during the call" in str(event.error)
        assert engine.residency() == {} and engine.kv.resident_bytes == 0
        assert ctx.id not in engine.kv.context_ids() and ctx.id not in engine.kv.ledger.contexts
    finally:
        engine.stop()
        engine.close()
        catalog.close()
