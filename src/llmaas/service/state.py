"""What the HTTP handlers share: the catalogue, the engine, authentication, and the bridge from engine events to
the event loop.

Owns the async side of a call: submit to the engine (a full queue is a 429), receive its events in the event loop,
and cancel it when the client goes away (checked while waiting, so a queued or slow call is stopped too). Ignores
HTTP formats (the API modules) and computation (the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmaas.engine.calls import (
    Call,
    CallDone,
    CallEvent,
    CallFailed,
    CallResult,
    ChooseDone,
    ChooseResult,
    EmbedDone,
    EmbedResult,
)
from llmaas.engine.generate import TextDelta
from llmaas.engine.worker import Engine
from llmaas.errors import CallCancelled
from llmaas.records import App
from llmaas.service.errors import ApiError
from llmaas.storage.catalog import Catalog
from llmaas.tlm.resident import ResidentTinyLM

DISCONNECT_POLL_S = 0.25
RECENT_CALLS_PER_APP = 20


@dataclass
class ServiceState:
    catalog: Catalog
    engine: Engine
    model_id: str
    created: int
    recent_calls: dict[int, deque[dict]] = field(default_factory=lambda: defaultdict(
        lambda: deque(maxlen=RECENT_CALLS_PER_APP)))
    tiny_lm: ResidentTinyLM = field(default_factory=ResidentTinyLM)  # nothing is read until a request needs it

    def record(self, app: App, result: CallResult) -> None:
        self.recent_calls[app.id].append({"context_id": result.context_id, "finish_reason": result.finish_reason,
                                          "prompt_tokens": result.prompt_tokens,
                                          "completion_tokens": result.completion_tokens,
                                          **result.timings.__dict__})


def get_state(request: Request) -> ServiceState:
    return request.app.state.llmaas


_bearer = HTTPBearer(auto_error=False, description="the app's key, from `llmaas apps add NAME`")


def authenticate(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                 state: ServiceState = Depends(get_state)) -> App:
    """The calling app, from `Authorization: Bearer <key>`. The key is looked up on every request, so a key that
    was rotated or an app that was removed is refused at once, even by a running service."""
    if credentials is None:
        raise ApiError(401, "authentication_error", "missing API key: send 'Authorization: Bearer <key>' (keys come "
                                                    "from `llmaas apps add NAME`)")
    app = state.catalog.app_for_key(credentials.credentials)
    if app is None:
        raise ApiError(401, "authentication_error", "invalid API key")
    return app


def is_operator(request: Request, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """The operator is whoever reaches the Unix socket (mode 0600: the service's own user) without an app key.
    Over TCP there is no operator: every request is an app's."""
    return credentials is None and request.client is None  # uvicorn gives no client address on a Unix socket


def app_or_operator(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    state: ServiceState = Depends(get_state)) -> App | None:
    """The calling app, or None for the operator."""
    return None if is_operator(request, credentials) else authenticate(credentials, state)


def operator_only(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    if not is_operator(request, credentials):
        raise ApiError(403, "permission_error", "operator routes answer only on the service's Unix socket, without "
                                                "an app key (e.g. `llmaas apps remove`)")


class CallStream:
    """One submitted call's events, delivered into the event loop."""

    def __init__(self, state: ServiceState, call: Call, request: Request) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[CallEvent] = asyncio.Queue()
        self._request = request
        self._finished = False
        self._first: CallEvent | None = None
        self._state = state
        self.ticket = state.engine.submit(call, self._sink)  # QueueFullError -> 429

    def _sink(self, event: CallEvent) -> None:  # called on the compute thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the service is shutting down
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def _next(self) -> CallEvent:
        if self._first is not None:
            event, self._first = self._first, None
            return event
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await self._request.is_disconnected():
                    self.ticket.cancel()
                    raise CallCancelled("the client disconnected") from None

    async def start(self) -> None:
        """Wait for the first event, so that a call failing before its first token (unknown context, context too
        long) is answered with its own HTTP status rather than inside an already-started stream."""
        event = await self._next()
        if isinstance(event, CallFailed):
            self._finished = True
            raise event.error
        self._first = event

    async def events(self) -> AsyncIterator[TextDelta | CallDone | EmbedDone | ChooseDone]:
        """Text deltas, then the CallDone (or an embedding call's EmbedDone, a choice call's ChooseDone); a
        CallFailed is raised as its error. Cancels the call if abandoned."""
        try:
            while True:
                event = await self._next()
                if isinstance(event, CallFailed):
                    self._finished = True
                    raise event.error
                if isinstance(event, CallDone):
                    self._state.record(self.ticket.call.app, event.result)
                self._finished = isinstance(event, CallDone | EmbedDone | ChooseDone)
                yield event
                if self._finished:
                    return
        finally:
            if not self._finished:
                self.ticket.cancel()

    async def result(self) -> CallResult:
        async for event in self.events():
            if isinstance(event, CallDone):
                return event.result
        raise AssertionError("a call ended without a result")

    async def embedding(self) -> EmbedResult:
        async for event in self.events():
            if isinstance(event, EmbedDone):
                return event.result
        raise AssertionError("an embedding call ended without a result")

    async def choice(self) -> ChooseResult:
        async for event in self.events():
            if isinstance(event, ChooseDone):
                return event.result
        raise AssertionError("a choice call ended without a result")
