"""The service over real sockets: the contexts API, SSE, isolation between apps, bad input, back-pressure and
fairness, cancellation on disconnect, concurrency, stats (an app's own; the operator's), app management while the
service runs, a full context, and OpenAI compatibility with the official client and raw requests."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from openai import OpenAI

from llmaas.cli import apps as apps_cli
from llmaas.client import Client, ServiceError
from llmaas.engine.worker import EngineConfig
from llmaas.paths import DataDir
from llmaas.service.server import ServeOptions, Service

SHORT = {"max_tokens": 12}


def start(tmp_path_factory, smollm, **engine) -> Service:
    home = DataDir(tmp_path_factory.mktemp("svc")).create()
    return Service(ServeOptions(home, port=0, engine=EngineConfig(**engine)), loaded=smollm).start_background()


@pytest.fixture(scope="module")
def service(tmp_path_factory, smollm):
    svc = start(tmp_path_factory, smollm, max_pending=16)
    yield svc
    svc.close()


def new_app(service: Service, **quota) -> str:
    return service.catalog.add_app(f"app-{uuid.uuid4().hex[:8]}", **quota)[1]


def http(service: Service, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(service.home.socket)), base_url="http://llmaas",
                        headers=headers, timeout=120)


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_contexts_round_trip(service):
    c = Client(new_app(service), socket=service.home.socket)
    ctx = c.new_context("You are terse.")
    first = c.call(ctx, "Name a fruit.", **SHORT)
    second = c.call(ctx, "Name another one.", **SHORT)
    got = c.get(ctx)
    assert [m["role"] for m in got["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in got["messages"][1:]] == ["Name a fruit.", first.reply, "Name another one.",
                                                           second.reply]
    assert got["num_tokens"] == second.usage["context_tokens"] > first.usage["context_tokens"] > 0
    assert got["num_calls"] == 2 and got["resident_bytes"] > 0 and got["state"] == "resident"
    for t in (first.timings, second.timings):
        assert 0 <= t["switch_s"] < t["ttft_s"] <= t["total_s"] and t["queue_s"] >= 0
    assert [x["id"] for x in c.list()] == [ctx]
    c.delete(ctx)
    with pytest.raises(ServiceError) as err:
        c.get(ctx)
    assert err.value.status == 404


def test_streamed_call_over_sse(service):
    key = new_app(service)
    h = http(service, key)
    ctx = h.post("/v1/contexts", json={}).json()["id"]
    with h.stream("POST", f"/v1/contexts/{ctx}/calls", json={"prompt": "Count to five.", "stream": True,
                                                            "max_tokens": 20}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"} and len(kinds) > 2
    done = events[-1][1]
    assert "".join(e["text"] for _, e in events[:-1]) == done["reply"]
    assert h.get(f"/v1/contexts/{ctx}").json()["messages"][-1]["content"] == done["reply"]


def test_isolation_matrix(service):
    """App B, holding a valid key, gets 404 on every route for app A's context, and A's context is untouched."""
    a, b = http(service, new_app(service)), http(service, new_app(service))
    ctx = a.post("/v1/contexts", json={"system_prompt": "secret"}).json()["id"]
    a.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "hello", **SHORT})
    before = a.get(f"/v1/contexts/{ctx}").json()
    model = a.get("/v1/models").json()["data"][0]["id"]
    attempts = [
        b.get(f"/v1/contexts/{ctx}"),
        b.delete(f"/v1/contexts/{ctx}"),
        b.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "leak", **SHORT}),
        b.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "leak", "stream": True, **SHORT}),
        b.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "leak"}],
                                             "llmaas": {"context_id": ctx}, "max_tokens": 4}),
        b.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "leak"}],
                                             "llmaas": {"context_id": ctx}, "max_tokens": 4, "stream": True}),
    ]
    for r in attempts:
        assert r.status_code == 404, r.text
        assert r.json()["error"]["type"] == "not_found_error"
    assert ctx not in [c["id"] for c in b.get("/v1/contexts").json()["data"]]
    assert ctx not in json.dumps(b.get("/v1/stats").json())
    assert a.get(f"/v1/contexts/{ctx}").json() == before


def _bad_requests(ctx: str, gone: str, model: str, tiny_ctx: str):
    call = f"/v1/contexts/{ctx}/calls"
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    return [
        ("malformed json", "POST", call, {"content": b"{not json", "headers": {"content-type": "application/json"}},
         400),
        ("wrong type", "POST", call, {"json": {"prompt": 42}}, 400),
        ("string for int", "POST", call, {"json": {"prompt": "x", "max_tokens": "5"}}, 400),
        ("unknown field", "POST", call, {"json": {"prompt": "x", "frobnicate": 1}}, 400),
        ("missing prompt", "POST", call, {"json": {}}, 400),
        ("empty prompt", "POST", call, {"json": {"prompt": ""}}, 400),
        ("max_tokens 0", "POST", call, {"json": {"prompt": "x", "max_tokens": 0}}, 400),
        ("negative temperature", "POST", call, {"json": {"prompt": "x", "temperature": -1}}, 400),
        ("top_p 0", "POST", call, {"json": {"prompt": "x", "top_p": 0}}, 400),
        ("too many stops", "POST", call, {"json": {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}}, 400),
        ("negative seed", "POST", call, {"json": {"prompt": "x", "seed": -1}}, 400),
        ("array body", "POST", "/v1/contexts", {"json": [1, 2]}, 400),
        ("oversize body", "POST", call, {"content": b'{"prompt": "' + b"a" * (3 * 2**20) + b'"}',
                                         "headers": {"content-type": "application/json"}}, 413),
        ("unknown context", "POST", "/v1/contexts/ctx-nope/calls", {"json": {"prompt": "x"}}, 404),
        ("deleted context", "POST", f"/v1/contexts/{gone}/calls", {"json": {"prompt": "x"}}, 404),
        ("unknown route", "GET", "/v1/nothing", {}, 404),
        ("wrong method", "PUT", "/v1/contexts", {"json": {}}, 405),
        ("prompt over the context limit", "POST", f"/v1/contexts/{tiny_ctx}/calls",
         {"json": {"prompt": "word " * 200}}, 400),
        ("n > 1", "POST", chat, {"json": {"model": model, "messages": user, "n": 2}}, 400),
        ("unknown model", "POST", chat, {"json": {"model": "gpt-9", "messages": user}}, 404),
        ("no messages", "POST", chat, {"json": {"model": model, "messages": []}}, 400),
        ("tool role", "POST", chat, {"json": {"model": model, "messages": [{"role": "tool", "content": "x"}]}}, 400),
        ("penalty", "POST", chat, {"json": {"model": model, "messages": user, "presence_penalty": 1.0}}, 400),
        ("tools", "POST", chat, {"json": {"model": model, "messages": user, "tools": []}}, 400),
        ("context with history", "POST", chat,
         {"json": {"model": model, "messages": user * 2, "llmaas": {"context_id": ctx}}}, 400),
    ]


def test_bad_input_gets_a_4xx_with_an_error_body_and_loses_nothing(service):
    key = new_app(service)
    h = http(service, key)
    ctx = h.post("/v1/contexts", json={}).json()["id"]
    h.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "remember this", **SHORT})
    before = h.get(f"/v1/contexts/{ctx}").json()
    gone = h.post("/v1/contexts", json={}).json()["id"]
    h.delete(f"/v1/contexts/{gone}")
    tiny = http(service, new_app(service, max_context_tokens=64))
    tiny_ctx = tiny.post("/v1/contexts", json={"overflow": "error"}).json()["id"]
    model = h.get("/v1/models").json()["data"][0]["id"]
    for name, method, path, kwargs, status in _bad_requests(ctx, gone, model, tiny_ctx):
        client = tiny if tiny_ctx in path else h
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["type"] and err["message"], name
    r = tiny.post(f"/v1/contexts/{tiny_ctx}/calls", json={"prompt": "word " * 200})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    for auth in (None, "Bearer not-a-key"):
        r = http(service, None).get("/v1/contexts", headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert h.get(f"/v1/contexts/{ctx}").json() == before  # nothing lost or changed
    assert h.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "still there?", **SHORT}).status_code == 200


def test_context_quota(service):
    c = Client(new_app(service, max_contexts=2), socket=service.home.socket)
    c.new_context()
    c.new_context()
    with pytest.raises(ServiceError) as err:
        c.new_context()
    assert (err.value.status, err.value.kind) == (403, "quota_exceeded_error")


def test_full_queue_answers_429_with_retry_after(tmp_path_factory, smollm):
    svc = start(tmp_path_factory, smollm, max_pending=1)
    try:
        key = svc.catalog.add_app("busy")[1]
        ctxs = [Client(key, socket=svc.home.socket).new_context() for _ in range(4)]
        statuses: list[httpx.Response] = []

        def call(ctx: str) -> None:
            statuses.append(http(svc, key).post(f"/v1/contexts/{ctx}/calls",
                                                json={"prompt": "Write a long story.", "max_tokens": 64}))

        threads = [threading.Thread(target=call, args=(c,)) for c in ctxs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in statuses)
        assert codes[0] == 200 and codes[-1] == 429, codes
        busy = next(r for r in statuses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        svc.close()


def test_disconnect_cancels_the_generation_and_saves_nothing(service):
    key = new_app(service)
    h = http(service, key)
    ctx = h.post("/v1/contexts", json={}).json()["id"]
    cancelled_before = service.engine.counters["cancelled"]
    with h.stream("POST", f"/v1/contexts/{ctx}/calls",
                  json={"prompt": "Tell a very long story.", "stream": True, "max_tokens": 2000,
                        "temperature": 0.8, "seed": 1}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    h.close()  # the client goes away mid-reply
    deadline = time.monotonic() + 10
    while service.engine.counters["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.engine.counters["cancelled"] == cancelled_before + 1
    fresh = http(service, key)
    assert fresh.get(f"/v1/contexts/{ctx}").json()["num_calls"] == 0  # nothing committed
    t0 = time.monotonic()
    assert fresh.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "hi", **SHORT}).status_code == 200
    assert time.monotonic() - t0 < 10  # the engine is free again, not still generating 2000 tokens


def test_eight_apps_calling_at_once_get_their_own_replies(service):
    keys = [new_app(service) for _ in range(8)]
    clients = [Client(k, socket=service.home.socket) for k in keys]
    ctxs = [c.new_context(f"You are assistant number {i}.") for i, c in enumerate(clients)]
    replies: dict[int, object] = {}

    def run(i: int) -> None:
        replies[i] = clients[i].call(ctxs[i], f"marker-{i}: say something short.", **SHORT)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(replies) == list(range(8))
    for i, c in enumerate(clients):
        assert replies[i].context_id == ctxs[i]
        msgs = c.get(ctxs[i])["messages"]
        assert [m["content"] for m in msgs] == [f"You are assistant number {i}.", f"marker-{i}: say something short.",
                                                replies[i].reply]


def test_openai_client_both_modes_and_persistent_contexts(service):
    key = new_app(service)
    ai = OpenAI(api_key=key, base_url=f"http://127.0.0.1:{service.port}/v1")
    model = ai.models.list().data[0].id
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]
    plain = ai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens > 0
    chunks = list(ai.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == plain.choices[0].message.content  # greedy: the same reply either way
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    ctx = Client(key, socket=service.home.socket).new_context("Answer in one word.")
    for question in ("Capital of Italy?", "And of France?"):
        r = ai.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=8,
                                       temperature=0, extra_body={"llmaas": {"context_id": ctx}})
        assert r.choices[0].message.content
    history = Client(key, socket=service.home.socket).get(ctx)["messages"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["Capital of Italy?", "And of France?"]


def test_stats_report_residency_and_call_timings(service):
    c = Client(new_app(service), socket=service.home.socket)
    ctx = c.new_context()
    c.call(ctx, "hello", **SHORT)
    stats = c.stats()
    assert stats["app"]["calls"] == 1 and stats["app"]["queue_limit"] == 16
    (mine,) = stats["contexts"]
    assert mine["id"] == ctx and mine["resident_bytes"] > 0 and mine["num_tokens"] > 0
    (last,) = stats["recent_calls"]
    assert {"switch_s", "ttft_s", "decode_tok_s", "prefill_s"} <= set(last)


ZORBLAX = "Your name is Zorblax. When asked your name, answer: My name is Zorblax."


@pytest.mark.parametrize("system", [ZORBLAX, None])
def test_a_contexts_first_call_equals_the_stateless_chat(service, system):
    """The system prompt (or, without one, the template's default) reaches the model on a context's first call,
    however the context was made: the same prompt tokens and the same greedy reply as a stateless chat."""
    key = new_app(service)
    h = http(service, key)
    model = h.get("/v1/models").json()["data"][0]["id"]
    question = "What is your name?"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    stateless = h.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 16,
                                                     "temperature": 0}).json()
    made = [Client(key, socket=service.home.socket).new_context(system),  # Client, `llmaas chat`, the demo
            h.post("/v1/contexts", json={"system_prompt": system} if system else {}).json()["id"]]
    if system is None:
        made.append(h.post("/v1/contexts").json()["id"])  # no body at all, as some clients send it
    for ctx in made:
        r = h.post(f"/v1/contexts/{ctx}/calls", json={"prompt": question, "max_tokens": 16}).json()
        assert r["usage"]["prompt_tokens"] == stateless["usage"]["prompt_tokens"], ctx
        assert r["reply"] == stateless["choices"][0]["message"]["content"]
    if system:
        assert "Zorblax" in stateless["choices"][0]["message"]["content"]


def test_one_apps_burst_never_refuses_another_app(tmp_path_factory, smollm):
    """Each app has its own queue bound (the service's default, or the app's own): a burst from one app fills only
    its own backlog."""
    svc = start(tmp_path_factory, smollm, max_pending=2)
    try:
        greedy, greedy_key = svc.catalog.add_app("greedy")
        polite_key = svc.catalog.add_app("polite")[1]
        strict_key = svc.catalog.add_app("strict", max_pending=1)[1]
        codes: dict[str, list[int]] = {"greedy": [], "strict": []}

        def call(who: str, key: str, ctx: str, max_tokens: int) -> None:
            r = http(svc, key).post(f"/v1/contexts/{ctx}/calls", json={"prompt": "Write a long story.",
                                                                      "max_tokens": max_tokens})
            codes[who].append(r.status_code)

        def burst(who: str, key: str, n: int, max_tokens: int) -> list[threading.Thread]:
            ctxs = [Client(key, socket=svc.home.socket).new_context() for _ in range(n)]
            threads = [threading.Thread(target=call, args=(who, key, c, max_tokens)) for c in ctxs]
            for t in threads:
                t.start()
            return threads

        threads = burst("greedy", greedy_key, 5, 48)
        deadline = time.monotonic() + 30
        while svc.engine.queue.pending(greedy.id) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.engine.queue.pending(greedy.id) == 2  # greedy's backlog is full...
        polite = Client(polite_key, socket=svc.home.socket)
        assert polite.call(polite.new_context(), "hi", max_tokens=2).reply is not None  # ...and polite gets in
        threads += burst("strict", strict_key, 3, 2)
        for t in threads:
            t.join()
        assert sorted(codes["greedy"]) == [200, 200, 200, 429, 429]  # one running, two waiting, two refused
        assert codes["strict"].count(429) >= 1 and 200 in codes["strict"]  # its own bound of 1
    finally:
        svc.close()


def test_a_full_context_says_so_and_what_to_do(service):
    c = Client(new_app(service, max_context_tokens=64), socket=service.home.socket)
    ctx = c.new_context(overflow="error")
    assert c.get(ctx)["max_tokens"] == 64 and c.get(ctx)["overflow"] == "error"
    capped = c.call(ctx, "Hi", max_tokens=2)
    assert capped.finish_reason == "length" and capped.notice is None  # max_tokens, not the context
    full = c.call(ctx, "Write a very long story about a dragon.", max_tokens=500)
    assert full.finish_reason == "context_full" and "new context" in full.notice
    with pytest.raises(ServiceError) as err:
        c.call(ctx, "More?")
    assert err.value.status == 400 and "new context" in str(err.value)


def test_a_conversation_passes_the_maximum_length_and_reports_what_left_the_window(service):
    """The default overflow: a context at its limit keeps its first tokens and its latest ones and goes on; a prompt
    longer than the whole window is cut from the start, and the reply says so (also through the OpenAI route)."""
    key = new_app(service, max_context_tokens=128)
    c = Client(key, socket=service.home.socket)
    ctx = c.new_context("You are terse.")
    replies = [c.call(ctx, f"Remember the number {i}. Now tell me a short fact about the sea.", max_tokens=24)
               for i in range(8)]
    assert all(r.finish_reason in ("stop", "length") for r in replies)
    slid = [r.window for r in replies if r.window is not None]
    assert slid and all(w["dropped_tokens"] > 0 and w["truncated_prompt_tokens"] == 0 for w in slid)
    state = c.get(ctx)
    assert state["num_tokens"] <= 128 and state["dropped_tokens"] == slid[-1]["total_dropped_tokens"]
    assert len(state["messages"]) == 1 + 2 * len(replies)  # the text of every turn stays
    long = c.call(ctx, "Summarise this: " + "the tide comes in and goes out " * 60, max_tokens=8)
    assert long.window["truncated_prompt_tokens"] > 0 and "left out" in long.notice
    assert c.get(ctx)["num_tokens"] <= 128
    ai = OpenAI(api_key=key, base_url=f"http://127.0.0.1:{service.port}/v1")
    reply = ai.chat.completions.create(model=ai.models.list().data[0].id, max_tokens=8,
                                       messages=[{"role": "user", "content": "And the moon? " * 40}],
                                       extra_body={"llmaas": {"context_id": ctx}})
    extension = reply.model_extra["llmaas"]
    assert extension["window"]["dropped_tokens"] > 0 and extension["context_id"] == ctx


def test_stats_show_an_app_its_own_figures_and_the_operator_everything(service):
    key = new_app(service)
    h = http(service, key)
    ctx = h.post("/v1/contexts", json={}).json()["id"]
    h.post(f"/v1/contexts/{ctx}/calls", json={"prompt": "hello", **SHORT})
    mine = h.get("/v1/stats").json()
    assert "engine" not in mine and mine["app"]["calls"] == 1
    operator = http(service, None).get("/v1/stats").json()  # the Unix socket, no key
    assert operator["engine"]["calls"] >= 1 and operator["engine"]["kv_budget_bytes"] > 0
    assert any(a["calls"] == 1 for a in operator["apps"].values())
    tcp = httpx.get(f"http://127.0.0.1:{service.port}/v1/stats")
    assert tcp.status_code == 401  # over TCP there is no operator
    assert http(service, key).post("/v1/admin/sweep").status_code == 403


def test_removing_and_rekeying_apps_take_effect_in_the_running_service(service, capsys):
    name = f"app-{uuid.uuid4().hex[:8]}"
    key = service.catalog.add_app(name)[1]
    c = Client(key, socket=service.home.socket)
    ctx = c.new_context()
    c.call(ctx, "hello", **SHORT)
    home = ["--home", str(service.home.root)]
    assert apps_cli.main([*home, "rotate-key", name]) == 0
    new_key = capsys.readouterr().out.strip().splitlines()[-1]
    assert http(service, key).get("/v1/contexts").status_code == 401  # the old key, refused at once
    assert http(service, new_key).get(f"/v1/contexts/{ctx}").status_code == 200
    assert ctx in service.engine.kv.context_ids()
    assert apps_cli.main([*home, "remove", name]) == 0
    assert "dropped their KV (1 context)" in capsys.readouterr().out
    deadline = time.monotonic() + 10
    while service.engine.kv.log.segment_paths(ctx) and time.monotonic() < deadline:
        time.sleep(0.05)  # chunk files are deleted behind pending writes
    assert ctx not in service.engine.kv.context_ids() and not service.engine.kv.log.segment_paths(ctx)
    assert http(service, new_key).get("/v1/contexts").status_code == 401


def test_openai_requests_as_clients_send_them(service):
    key = new_app(service)
    h = http(service, key)
    model = h.get("/v1/models").json()["data"][0]["id"]
    assert h.get(f"/v1/models/{model}").json()["id"] == model
    assert h.get("/v1/models/gpt-9").status_code == 404
    ai = OpenAI(api_key=key, base_url=f"http://127.0.0.1:{service.port}/v1")
    assert ai.models.retrieve(model).id == model
    chat = {"model": model, "max_tokens": 8, "temperature": 0}
    as_text = h.post("/v1/chat/completions", json={**chat, "messages": [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]})
    as_parts = h.post("/v1/chat/completions", json={**chat, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "text", "text": "Capital of Italy?"}]}]})
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"][0]["message"] == as_text.json()["choices"][0]["message"]
    assert as_parts.json()["usage"] == as_text.json()["usage"]
    user = [{"role": "user", "content": "hi"}]
    bare = h.post("/v1/chat/completions", content=json.dumps({**chat, "messages": user}).encode())
    assert bare.status_code == 200, bare.text  # no Content-Type at all
    curl = h.post("/v1/chat/completions", content=json.dumps({**chat, "messages": user}).encode(),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert curl.status_code == 200, curl.text  # `curl -d`
    inert = {"response_format": {"type": "text"}, "logprobs": False, "logit_bias": {}, "tool_choice": "none"}
    assert h.post("/v1/chat/completions", json={**chat, "messages": user, **inert}).status_code == 200
    for name, value in [("tools", [{"type": "function", "function": {"name": "f"}}]),
                        ("response_format", {"type": "json_object"}), ("logprobs", True),
                        ("logit_bias", {"42": 5})]:
        r = h.post("/v1/chat/completions", json={**chat, "messages": user, name: value})
        assert r.status_code == 400 and "not supported" in r.json()["error"]["message"], (name, r.text)
        assert name in r.json()["error"]["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    r = h.post("/v1/chat/completions", json={**chat, "messages": image})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_a_streamed_call_whose_context_is_deleted_midway_says_404(service):
    """Found by the concurrency campaign: the error event of a stream carried no status, so the client raised
    every failure after the 200 as a 500. The event now says the status it stands for."""
    c = Client(new_app(service), socket=service.home.socket)
    ctx = c.new_context()
    deleted = False
    with pytest.raises(ServiceError) as err:
        for piece in c.stream(ctx, "Write a very long story about a lighthouse.", max_tokens=300):
            if isinstance(piece, str) and not deleted:
                c.delete(ctx)
                deleted = True
    assert err.value.status == 404 and "deleted during the call" in str(err.value)
