"""The LLMS contexts API: new context, call (plain or streamed over SSE), get, list and delete.

Owns the routes and their JSON; every route acts only on the calling app's contexts, and another app's context id
answers 404 exactly like one that never existed. Ignores generation (the engine) and storage (the catalogue).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from llmaas.engine.calls import CallDone, CallParams, CallResult, ContextCall
from llmaas.engine.sampling import SamplingParams
from llmaas.errors import LlmaasError, NotFoundError
from llmaas.records import App, ContextRecord
from llmaas.service.errors import to_response
from llmaas.service.schemas import (
    CallBody,
    CallOut,
    ContextList,
    ContextOut,
    Deleted,
    MessageOut,
    NewContext,
    TimingsOut,
    Usage,
    WindowOut,
)
from llmaas.service.state import CallStream, ServiceState, authenticate, get_state

router = APIRouter(prefix="/v1", tags=["contexts"])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def context_out(state: ServiceState, app: App, ctx: ContextRecord) -> ContextOut:
    r = state.engine.residency().get(ctx.id)
    resident = r.resident_bytes if r else 0
    return ContextOut(id=ctx.id, created_at=ctx.created_at, updated_at=ctx.updated_at, num_calls=ctx.num_calls,
                      num_tokens=len(ctx.token_ids), max_tokens=state.engine.context_limit(app),
                      state="resident" if resident else "stored",
                      resident_bytes=resident, overflow=ctx.overflow, dropped_tokens=ctx.dropped_tokens,
                      messages=[MessageOut(role=m.role, content=m.content) for m in ctx.messages])


def call_out(r: CallResult) -> CallOut:
    return CallOut(context_id=r.context_id, reply=r.reply, finish_reason=r.finish_reason,
                   usage=Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                               context_tokens=r.context_tokens),
                   timings=TimingsOut(**r.timings.__dict__),
                   window=WindowOut(**r.window.__dict__) if r.window is not None else None, notice=finish_notice(r))


def finish_notice(r: CallResult) -> str | None:
    """What the caller should do after this reply, or know about it: a full context, a prompt cut to fit."""
    if r.finish_reason == "context_full":
        return (f"the context is full ({r.context_tokens} tokens, its limit): the reply was cut and the next call on "
                "it will be refused; start a new context (or delete this one)")
    if r.window is not None and r.window.truncated_prompt_tokens:
        return (f"the prompt alone did not fit the context's window: its first {r.window.truncated_prompt_tokens} "
                "tokens were left out, and the model saw only the rest; send long documents in smaller parts")
    return None


def _own_context(state: ServiceState, app: App, context_id: str) -> ContextRecord:
    ctx = state.catalog.get_context(app.id, context_id)
    if ctx is None:
        raise NotFoundError(f"no context {context_id!r}")
    return ctx


@router.post("/contexts", status_code=201, response_model=ContextOut, summary="Create a context")
def new_context(body: NewContext | None = None, app: App = Depends(authenticate),
                state: ServiceState = Depends(get_state)) -> ContextOut:
    body = body if body is not None else NewContext()
    return context_out(state, app, state.catalog.create_context(app, body.system_prompt, body.overflow))


@router.get("/contexts", response_model=ContextList, summary="List the app's contexts")
def list_contexts(app: App = Depends(authenticate), state: ServiceState = Depends(get_state)) -> ContextList:
    return ContextList(data=[context_out(state, app, c) for c in state.catalog.list_contexts(app.id)])


@router.get("/contexts/{context_id}", response_model=ContextOut, summary="Get a context: messages, tokens, state")
def get_context(context_id: str, app: App = Depends(authenticate),
                state: ServiceState = Depends(get_state)) -> ContextOut:
    return context_out(state, app, _own_context(state, app, context_id))


@router.delete("/contexts/{context_id}", response_model=Deleted, summary="Delete a context")
def delete_context(context_id: str, app: App = Depends(authenticate),
                   state: ServiceState = Depends(get_state)) -> Deleted:
    if not state.catalog.delete_context(app.id, context_id):
        raise NotFoundError(f"no context {context_id!r}")
    state.engine.forget_context(context_id)
    return Deleted(id=context_id, deleted=True)


@router.post("/contexts/{context_id}/calls", response_model=CallOut, summary="Call the model on a context",
             description="Appends `prompt` as a user turn, generates the reply, and returns it once it is saved. With "
                         "`stream: true` the reply comes as server-sent events: `delta` events ({\"text\"}), then one "
                         "`done` (this route's JSON) or `error` ({\"error\"}, with the HTTP status it stands for in "
                         "`error.status`).",
             responses={200: {"content": {"text/event-stream": {}}}})
async def call_context(context_id: str, body: CallBody, request: Request, app: App = Depends(authenticate),
                       state: ServiceState = Depends(get_state)):
    params = CallParams(body.max_tokens, SamplingParams(float(body.temperature), body.top_k, float(body.top_p),
                                                        body.seed), tuple(body.stop))
    stream = CallStream(state, ContextCall(app, context_id, body.prompt, params), request)
    if not body.stream:
        return call_out(await stream.result())
    await stream.start()
    return StreamingResponse(_sse(stream), media_type="text/event-stream", headers=SSE_HEADERS)


async def _sse(stream: CallStream) -> AsyncIterator[str]:
    try:
        async for event in stream.events():
            if isinstance(event, CallDone):
                yield f"event: done\ndata: {call_out(event.result).model_dump_json()}\n\n"
            else:
                yield f"event: delta\ndata: {json.dumps({'text': event.text})}\n\n"
    except LlmaasError as exc:
        # the stream's HTTP status (200) is already sent: the error event carries the status it stands for
        response = to_response(exc)
        body = json.loads(bytes(response.body))
        body["error"]["status"] = response.status_code
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
