"""The attention-sink window (engine/window.py): its arithmetic on ids, and a conversation of over 10,000 tokens on a
2,048-token context that slides many times without an error, keeps its window across a restart, deletes the chunks
that left it, and whose KV then equals a from-scratch prefill of the retained ids at positions 0.. (lossless codec)."""

from __future__ import annotations

import queue
import random

import pytest

from llmaas.engine.calls import CallDone, CallFailed, CallParams, CallResult, ContextCall
from llmaas.engine.generate import Generator
from llmaas.engine.window import fit
from llmaas.engine.worker import Engine, EngineConfig
from llmaas.errors import ContextLengthError
from llmaas.kv.dense import DenseKVCache
from llmaas.memory.policy import POLICIES
from llmaas.model.linear import BF16
from llmaas.storage.catalog import Catalog

SINKS, CLOSING = 16, 3


def test_a_call_that_fits_keeps_every_id():
    w = fit(list(range(100)), list(range(100, 120)), 2048, 256, CLOSING, SINKS)
    assert (w.held, w.prompt, w.dropped_tokens, w.truncated_prompt_tokens) == (list(range(100)),
                                                                                list(range(100, 120)), 0, 0)


def test_the_window_keeps_the_sinks_and_the_most_recent_ids():
    rng = random.Random(0)
    for _ in range(2000):
        limit = rng.choice([64, 128, 512, 2048])
        base_len, prompt_len = rng.randrange(0, 2 * limit), rng.randrange(1, 2 * limit)
        reply = rng.choice([1, 8, 256, 8192])
        base, prompt = list(range(base_len)), list(range(base_len, base_len + prompt_len))  # id == stream position
        w = fit(base, prompt, limit, reply, CLOSING, SINKS)
        retained, stream = w.held + w.prompt, base + prompt
        room = min(reply, limit // 2)
        if w.dropped_tokens == 0:
            assert retained == stream and len(stream) + CLOSING + room <= limit
            continue
        sinks = min(SINKS, len(stream))
        assert len(stream) + CLOSING + room > limit  # it slid only because it had to
        assert retained == stream[:sinks] + stream[len(stream) - (len(retained) - sinks):]
        assert len(retained) + CLOSING + room <= limit and w.dropped_tokens == len(stream) - len(retained)
        assert len(retained) <= max(limit // 2, sinks + prompt_len)  # about half the limit: the next slide is far
        assert w.held == [i for i in retained if i < base_len]  # the store restores these; the rest is prefilled
        assert w.truncated_prompt_tokens == prompt_len - sum(i >= base_len for i in retained)


def test_a_window_too_small_for_sinks_and_a_reply_is_a_clear_error():
    with pytest.raises(ContextLengthError, match="max_context_tokens"):
        fit(list(range(30)), [30, 31], 20, 10, 3, 16)


def call(engine: Engine, app, context_id: str, prompt: str) -> CallResult:
    events: queue.Queue = queue.Queue()
    engine.submit(ContextCall(app, context_id, prompt, CallParams(max_tokens=8)), events.put)
    while not isinstance(event := events.get(timeout=300), CallDone | CallFailed):
        pass
    assert isinstance(event, CallDone), event.error
    return event.result


WORDS = ["river", "stone", "light", "morning", "harbour", "lantern", "garden", "window", "bridge", "orchard", "meadow",
         "signal", "copper", "winter", "thread", "compass", "valley", "candle", "mirror", "island"]


def test_a_10k_token_conversation_on_a_2048_token_context_never_errors(tmp_path, smollm):
    catalog = Catalog(tmp_path / "c.sqlite3")
    app, _ = catalog.add_app("x")
    config = EngineConfig(memory=POLICIES["llms-lossless"], kv_dir=tmp_path / "kv", max_context_tokens=2048)
    engine = Engine(smollm, catalog, config).start()
    ctx = catalog.create_context(app, "You are a patient listener.")
    rng = random.Random(7)
    calls, restarted = 0, False
    try:
        while (now := catalog.get_context(app.id, ctx.id)).dropped_tokens + len(now.token_ids) < 10_000:
            r = call(engine, app, ctx.id, f"Part {calls}: " + " ".join(rng.choice(WORDS) for _ in range(420)))
            calls += 1
            assert r.context_tokens <= 2048 and (r.window is None or r.window.truncated_prompt_tokens == 0)
            if r.window is not None and not restarted:  # restart in the middle: the window is kept
                engine.stop()
                engine.close()
                engine = Engine(smollm, catalog, config).start()
                restarted = True
        assert restarted and engine.stats()["window_slides"] >= 2
        final = catalog.get_context(app.id, ctx.id)
        assert len(final.messages) == 1 + 2 * calls and final.dropped_tokens > 8_000
    finally:
        engine.stop()
    store = engine.kv
    store.writer.wait_idle()
    ids = list(final.token_ids)
    assert max(store.log.locations(ctx.id)) < -(-len(ids) // store.policy.chunk_tokens)  # dropped chunks are gone
    store.reclaim(store.budget_bytes)  # the window comes back from disk
    window = store.acquire(ctx.id, ids, len(ids) + 1)
    fresh = DenseKVCache(store.spec, len(ids))
    Generator(smollm.model, smollm.tokenizer).prefill(ids, fresh)
    tol = 0.25 if smollm.gemm == BF16 else 0.05  # rows from decode (kernels) vs from prefill (GEMM), in fp16
    for layer in range(store.spec.n_layers):
        assert (window.kv[layer][:, :, :len(ids)] - fresh.kv[layer][:, :, :len(ids)]).abs().max().item() < tol
    store.release(ctx.id, ids)
    engine.close()
    catalog.close()
