"""The engine below the HTTP layer: a context whose KV is dropped after every call and rebuilt by recompute from its
stored token ids continues exactly like one whose KV never left memory."""

from __future__ import annotations

import queue

from llmaas.engine.calls import CallDone, CallFailed, CallParams, ContextCall
from llmaas.engine.worker import Engine, EngineConfig
from llmaas.storage.catalog import Catalog

CONVERSATIONS = [("You are helpful.", ["Tell me about the moon.", "And the sun?", "Which is bigger?"]),
                 ("Answer briefly.", ["List three animals.", "Which is the fastest?", "Why?"])]


def converse(engine: Engine, catalog: Catalog, app, system: str, turns: list[str]) -> list[str]:
    ctx = catalog.create_context(app, system)
    replies = []
    for turn in turns:
        events: queue.Queue = queue.Queue()
        engine.submit(ContextCall(app, ctx.id, turn, CallParams(max_tokens=24)), events.put)
        while not isinstance(event := events.get(timeout=120), CallDone | CallFailed):
            pass
        assert isinstance(event, CallDone), event
        replies.append(event.result.reply)
    return replies


def test_recomputed_contexts_continue_like_never_evicted_ones(tmp_path, smollm):
    catalog = Catalog(tmp_path / "c.sqlite3")
    app, _ = catalog.add_app("x", max_contexts=10)
    kept = Engine(smollm, catalog, EngineConfig(kv_budget_bytes=2**30)).start()
    evicted = Engine(smollm, catalog, EngineConfig(kv_budget_bytes=0)).start()  # drops every context after a call
    try:
        for system, turns in CONVERSATIONS:
            assert converse(kept, catalog, app, system, turns) == converse(evicted, catalog, app, system, turns)
        assert evicted.kv.recomputed_tokens > 100 and evicted.kv.resident_bytes == 0
        assert kept.kv.resident_bytes > 0
    finally:
        kept.stop()
        evicted.stop()
        catalog.close()
