"""The ASGI application: routes, the request-size limit, and error handlers that give every failure the same shape.

Owns HTTP-level policy: bodies over MAX_BODY_BYTES are refused (413) before they are read whole; a body without a
JSON content type is read as JSON; malformed JSON, wrong types and unknown fields are 400; unknown routes 404;
anything unexpected is a logged 500 that never takes the service down. Ignores sockets and processes (server.py).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmaas.errors import LlmaasError
from llmaas.service import contexts_api, elastic_api, embeddings_api, openai_api, operator_api
from llmaas.service.errors import error_response, to_response
from llmaas.service.state import ServiceState

MAX_BODY_BYTES = 2 * 2**20
log = logging.getLogger("llmaas.http")
_KIND_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   405: "method_not_allowed", 413: "request_too_large"}


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over a limit, by Content-Length up front or while streaming in."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app, self.limit = app, limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "request_too_large",
                                  f"request body over {self.limit} bytes; send a shorter prompt")
        await response(scope, receive, send)


class JsonByDefault:
    """Read a request body as JSON when it comes without a JSON content type: with none at all (several OpenAI
    clients' raw modes) or as `curl -d`'s default form type. Every route here takes JSON; a body that is not JSON
    still gets a 400 that says so."""

    LENIENT = (b"", b"application/x-www-form-urlencoded", b"text/plain")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = dict(scope["headers"]).get(b"content-type", b"")
            if declared.split(b";")[0].strip().lower() in self.LENIENT:
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def openapi_spec() -> dict:
    """The API's OpenAPI document (what /openapi.json serves), without starting anything."""
    return create_app(None).openapi()


def create_app(state: ServiceState | None) -> FastAPI:
    app = FastAPI(title="llmaas", version="0.1.0",
                  description="On-device LLM system service: one resident model shared by many apps, with "
                              "persistent contexts (LLMS) and an OpenAI-compatible API. Every request is "
                              "authenticated as one app with `Authorization: Bearer <key>`.")
    app.state.llmaas = state
    app.include_router(contexts_api.router)
    app.include_router(openai_api.router)
    app.include_router(embeddings_api.router)
    app.include_router(elastic_api.router)
    app.include_router(operator_api.router)

    @app.get("/health", tags=["service"], summary="Liveness (no key needed)")
    def health() -> dict:
        return {"status": "ok", "model": state.model_id}

    @app.exception_handler(LlmaasError)
    async def _llmaas_error(request: Request, exc: LlmaasError):
        return to_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return error_response(400, "invalid_request_error", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, _KIND_BY_STATUS.get(exc.status_code, "invalid_request_error"),
                              str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"fields": {"path": request.url.path}})
        return error_response(500, "server_error", f"internal error ({type(exc).__name__}); the service is still up")

    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit, limit_bytes=MAX_BODY_BYTES)
    return app
