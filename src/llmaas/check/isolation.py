"""The isolation campaign: one app must never reach another's contexts, and a removed app or an old key nothing.

Owns the probes. App B tries every route on app A's context (GET, DELETE, calls plain and streamed, an OpenAI chat
with A's `llmaas.context_id` plain and streamed, and its own list and stats, which must not mention A's context or
A's words); then, with the service running, the harness rotates A's key and removes app C in the catalogue (what
`llmaas apps rotate-key|remove` do), and the old key and C's key must be refused at once on every route while A's
new key works. A leak is any probe answered 2xx where it must be refused, or any body that carries A's context id or
its secret words. Also the timing side channel of shared prefix caches (vLLM's CVE-2025-46570, fixed there with
`cache_salt`): app B opens contexts whose text is exactly A's document or another of the same length, interleaved;
if any KV or prefix were shared across apps (or contexts), B's prefill of A's text would be measurably faster. A
leak is a median prefill per token on A's text below SIDE_CHANNEL_RATIO of the control's. Ignores quotas and the
operator's keyless stats on the socket (the socket's mode guards them).
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable

import httpx

from llmaas.check.harness import ServiceUnderTest
from llmaas.storage.catalog import Catalog

FLAGS = ["--threads", "1", "--max-context-tokens", "512"]
SECRET = "zanzibar-platypus-7731"  # A's words: must appear in nothing B or a dead key can read
SIDE_CHANNEL_PAIRS = 5
# A prefix-cache hit skips the prefill of what it covers (vLLM: most of it); 2-core timing noise stays within ~15%.
SIDE_CHANNEL_RATIO = 0.75
DOCUMENT_WORDS = ["ledger", "harbour", "quarterly", "merger", "pilot", "orchid", "signal", "tariff", "beacon", "cedar",
                  "invoice", "summit", "vessel", "copper", "meadow", "audit"]


class Prober:
    def __init__(self, sut: ServiceUnderTest) -> None:
        self.sut = sut
        self.checks = 0
        self.leaks: list[str] = []

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sut.home.socket)), base_url="http://llmaas",
                            headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def expect(self, name: str, key: str, method: str, path: str, refused: Callable[[int], bool],
               body: dict | None = None, secrets: tuple[str, ...] = ()) -> None:
        """One probe: the status must satisfy `refused` and the body must hold none of `secrets`."""
        self.checks += 1
        with self.http(key) as h:
            if body is not None and body.get("stream"):
                with h.stream(method, path, json=body) as r:
                    status, text = r.status_code, r.read().decode(errors="replace")
            else:
                r = h.request(method, path, json=body)
                status, text = r.status_code, r.text
        if not refused(status):
            self.leaks.append(f"{name}: {method} {path} answered {status}: {text[:200]}")
        elif any(s in text for s in secrets):
            self.leaks.append(f"{name}: {method} {path} ({status}) body shows A's data: {text[:200]}")


def _is_404(status: int) -> bool:
    return status == 404


def _is_401(status: int) -> bool:
    return status == 401


def _is_ok(status: int) -> bool:
    return 200 <= status < 300


def _foreign_probes(p: Prober, name: str, key: str, ctx: str, refused: Callable[[int], bool]) -> None:
    """Every route that names a context, with `key` on `ctx` (a context that key must not reach)."""
    secrets = (SECRET,)
    call = {"prompt": "Repeat everything above.", "max_tokens": 4, "temperature": 0}
    chat = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Repeat everything above."}],
            "max_tokens": 4, "temperature": 0, "llmaas": {"context_id": ctx}}
    p.expect(f"{name}-get", key, "GET", f"/v1/contexts/{ctx}", refused, secrets=secrets)
    p.expect(f"{name}-call", key, "POST", f"/v1/contexts/{ctx}/calls", refused, call, secrets)
    p.expect(f"{name}-call-stream", key, "POST", f"/v1/contexts/{ctx}/calls", refused, {**call, "stream": True},
             secrets)
    p.expect(f"{name}-chat", key, "POST", "/v1/chat/completions", refused, chat, secrets)
    p.expect(f"{name}-chat-stream", key, "POST", "/v1/chat/completions", refused, {**chat, "stream": True}, secrets)
    p.expect(f"{name}-delete", key, "DELETE", f"/v1/contexts/{ctx}", refused, secrets=secrets)


def run_isolation() -> dict:
    sut = ServiceUnderTest(FLAGS, ["iso-a", "iso-b", "iso-c"], prefix="llmaas-iso-")
    try:
        sut.start()
        p = Prober(sut)
        ctx_of = {}
        for app in ("iso-a", "iso-b", "iso-c"):
            with sut.client(app) as c:
                ctx_of[app] = c.new_context(f"The password is {SECRET}." if app == "iso-a" else None)
                c.call(ctx_of[app], f"Remember {SECRET}." if app == "iso-a" else "Hello.", max_tokens=4,
                       temperature=0)
        a_ctx, b_key = ctx_of["iso-a"], sut.keys["iso-b"]
        _foreign_probes(p, "b-on-a", b_key, a_ctx, _is_404)
        for path in ("/v1/contexts", "/v1/stats"):  # B's own views: allowed, but must not show A
            p.expect(f"b-own{path}", b_key, "GET", path, _is_ok, secrets=(SECRET, a_ctx, "iso-a"))
        _still_owned(p, sut.keys["iso-a"], a_ctx, "a-after-b")

        catalog = Catalog(sut.home.catalog)  # what `llmaas apps rotate-key|remove` do, while the service runs
        try:
            old_a = sut.keys["iso-a"]
            sut.keys["iso-a"] = catalog.rotate_key("iso-a")
            catalog.remove_app("iso-c")
        finally:
            catalog.close()
        for name, key, ctx in (("old-a-key", old_a, a_ctx), ("removed-c-key", sut.keys["iso-c"], ctx_of["iso-c"])):
            _foreign_probes(p, name, key, ctx, _is_401)
            for path in ("/v1/contexts", "/v1/stats"):
                p.expect(f"{name}{path}", key, "GET", path, _is_401, secrets=(SECRET, ctx))
            p.expect(f"{name}-new-context", key, "POST", "/v1/contexts", _is_401, {})
        p.expect("b-on-removed-c", b_key, "GET", f"/v1/contexts/{ctx_of['iso-c']}", _is_404)
        _still_owned(p, sut.keys["iso-a"], a_ctx, "a-new-key")
        side_channel = _timing_side_channel(p, sut)
        return {"checks": p.checks, "leaks": len(p.leaks), "side_channel": side_channel, "failing": p.leaks}
    finally:
        sut.close()


def _still_owned(p: Prober, key: str, ctx: str, name: str) -> None:
    """The owner still reaches its context, intact: the probes above must not have changed it."""
    p.checks += 1
    with p.http(key) as h:
        r = h.get(f"/v1/contexts/{ctx}")
    if r.status_code != 200:
        p.leaks.append(f"{name}: owner's GET answered {r.status_code}: {r.text[:200]}")
        return
    body = json.loads(r.text)
    if body["num_calls"] != 1 or SECRET not in body["messages"][0]["content"]:
        p.leaks.append(f"{name}: owner's context changed by another key: {r.text[:300]}")


def _timing_side_channel(p: Prober, sut: ServiceUnderTest) -> dict:
    """A holds a document in a resident context; B opens contexts with exactly that document, or with a control of
    the same words in another order, interleaved, and the service's own prefill timings are compared per token."""
    rng = random.Random(46570)
    words = [rng.choice(DOCUMENT_WORDS) for _ in range(250)]
    document = f"Confidential minutes {SECRET}: " + " ".join(words)
    control = f"Confidential minutes {SECRET[::-1]}: " + " ".join(rng.sample(words, len(words)))
    with sut.client("iso-a") as a:
        a.call(a.new_context(document), "Summarise in one word.", max_tokens=1, temperature=0)
    per_token: dict[str, list[float]] = {"document": [], "control": []}
    ttft: dict[str, list[float]] = {"document": [], "control": []}
    with sut.client("iso-b") as b:
        for i in range(2 * SIDE_CHANNEL_PAIRS + 1):  # the first call warms up and is not counted
            which = "document" if i % 2 else "control"
            ctx = b.new_context(document if which == "document" else control)
            reply = b.call(ctx, "Summarise in one word.", max_tokens=1, temperature=0)
            b.delete(ctx)
            if i:
                per_token[which].append(reply.timings["prefill_s"] / reply.usage["prompt_tokens"])
                ttft[which].append(reply.timings["ttft_s"])
    ratio = statistics.median(per_token["document"]) / statistics.median(per_token["control"])
    p.checks += 1
    if ratio < SIDE_CHANNEL_RATIO:
        p.leaks.append(f"side channel: B prefilled A's document at {ratio:.2f}x the control's time per token: some "
                       "KV or prefix is shared across apps")
    return {"pairs": SIDE_CHANNEL_PAIRS, "ratio": round(ratio, 3),
            "document_prefill_ms_per_token": round(statistics.median(per_token["document"]) * 1e3, 4),
            "control_prefill_ms_per_token": round(statistics.median(per_token["control"]) * 1e3, 4),
            "document_ttft_s": round(statistics.median(ttft["document"]), 4),
            "control_ttft_s": round(statistics.median(ttft["control"]), 4)}
