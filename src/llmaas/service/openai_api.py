"""OpenAI-compatible routes: /v1/models, /v1/models/{id} and /v1/chat/completions (plain and streamed), checked with
the official `openai` client. The models are the resident LLM and, when installed, the tiny LM, which only embeds
(embeddings_api.py); a chat with it is refused.

Owns the translation between OpenAI's request and response shapes and engine calls. Stateless by default (the
conversation comes whole); with the extension field `llmaas: {"context_id": ...}` the chat runs on a persistent
context and only the new user message is sent; with `llmaas: {"slo": {...}}` a stateless chat runs elastically
(ElastiLM) and the reply's `llmaas` object says what was chosen. Ignores generation and storage.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from llmaas.elastic.slo import SloRequest
from llmaas.engine.calls import CallDone, CallParams, CallResult, ChatCall, ContextCall
from llmaas.engine.sampling import SamplingParams
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.records import App, Message
from llmaas.service.contexts_api import SSE_HEADERS, finish_notice
from llmaas.service.errors import ApiError, to_response
from llmaas.service.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionBody,
    ChatMessageOut,
    ChatUsage,
    ModelCard,
    ModelList,
    SloBody,
)
from llmaas.service.state import CallStream, ServiceState, authenticate, get_state
from llmaas.tlm.resident import TINY_LM_ID

router = APIRouter(prefix="/v1", tags=["openai"])
DEFAULT_MAX_TOKENS = 256


@router.get("/models", response_model=ModelList,
            summary="The resident model and the tiny LM for embeddings (OpenAI-compatible)")
def list_models(app: App = Depends(authenticate), state: ServiceState = Depends(get_state)) -> ModelList:
    return ModelList(data=_cards(state))


@router.get("/models/{model_id}", response_model=ModelCard, summary="One model (OpenAI-compatible)")
def get_model(model_id: str, app: App = Depends(authenticate), state: ServiceState = Depends(get_state)) -> ModelCard:
    for card in _cards(state):
        if card.id == model_id:
            return card
    raise ApiError(404, "not_found_error", f"model {model_id!r} not found; this service runs {state.model_id!r}")


def _cards(state: ServiceState) -> list[ModelCard]:
    """The LLM first (clients that take the first model get the one that chats), then the tiny LM if installed."""
    tiny = [ModelCard(id=TINY_LM_ID, created=state.created)] if state.tiny_lm.is_installed else []
    return [ModelCard(id=state.model_id, created=state.created), *tiny]


def _check_model(model_id: str, state: ServiceState) -> None:
    if model_id == TINY_LM_ID:
        raise InvalidRequestError(f"{TINY_LM_ID!r} is an embedding model: use it with POST /v1/embeddings, and chat "
                                  f"with {state.model_id!r}")
    if model_id != state.model_id:
        raise ApiError(404, "not_found_error", f"model {model_id!r} not found; this service runs {state.model_id!r}")


def _call(body: ChatCompletionBody, app: App, state: ServiceState):
    _check_model(body.model, state)
    unsupported = body.unsupported()
    if unsupported:
        raise InvalidRequestError(f"not supported by this service: {', '.join(unsupported)} (it generates plain text: "
                                  "no tool calls, JSON mode, logprobs or logit bias); leave them out")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    params = CallParams(body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
                        SamplingParams(temperature, 0, 1.0 if body.top_p is None else float(body.top_p), body.seed),
                        tuple(body.stop or ()))
    messages = tuple(Message(m.template_role, m.text) for m in body.messages)
    if body.llmaas is None or (body.llmaas.context_id is None and body.llmaas.slo is None):
        return ChatCall(app, messages, params)
    if body.llmaas.slo is not None:
        if body.llmaas.context_id is not None:
            raise InvalidRequestError("an SLO applies to stateless chats only: a persistent context always runs at the "
                                      "full level, since its stored KV is the full model's; leave out llmaas.slo or "
                                      "llmaas.context_id")
        return ChatCall(app, messages, params, slo_request(body.llmaas.slo))
    if len(body.messages) != 1 or body.messages[0].role != "user":
        raise InvalidRequestError("with llmaas.context_id, send only the new user message: the context holds the rest")
    return ContextCall(app, body.llmaas.context_id, body.messages[0].text, params)


def slo_request(slo: SloBody) -> SloRequest:
    return SloRequest(slo.ttft, slo.tpot, slo.ttft_ms, slo.tpot_ms)


def _finish(r: CallResult) -> tuple[str, dict]:
    """OpenAI's finish_reason (its clients know only stop and length) and llmaas's extension object, which tells a
    full context apart from max_tokens and reports a slid window."""
    extension: dict = {"context_id": r.context_id, "timings": r.timings.__dict__, **(r.elastic or {})}
    if r.window is not None:
        extension["window"] = r.window.__dict__
    if (notice := finish_notice(r)) is not None:
        extension["notice"] = notice
    if r.finish_reason == "context_full":
        extension["finish_detail"] = "context_full"
        return "length", extension
    return r.finish_reason, extension


@router.post("/chat/completions", response_model=ChatCompletion, summary="Chat completion (OpenAI-compatible)",
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: ChatCompletionBody, request: Request, app: App = Depends(authenticate),
                           state: ServiceState = Depends(get_state)):
    call = _call(body, app, state)
    stream = CallStream(state, call, request)
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        await stream.start()
        return StreamingResponse(_chunks(stream, completion_id, created, state.model_id, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    r = await stream.result()
    finish, extension = _finish(r)
    return ChatCompletion(
        id=completion_id, created=created, model=state.model_id,
        choices=[ChatChoice(message=ChatMessageOut(content=r.reply), finish_reason=finish)],
        usage=ChatUsage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                        total_tokens=r.prompt_tokens + r.completion_tokens),
        llmaas=extension)


async def _chunks(stream: CallStream, completion_id: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in stream.events():
            if isinstance(event, CallDone):
                r = event.result
                finish, extension = _finish(r)
                yield chunk({}, finish, llmaas=extension)
                if include_usage:
                    usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                             "total_tokens": r.prompt_tokens + r.completion_tokens}
                    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n"
            else:
                yield chunk({"content": event.text})
        yield "data: [DONE]\n\n"
    except LlmaasError as exc:
        yield f"data: {to_response(exc).body.decode()}\n\n"
