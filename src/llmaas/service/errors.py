"""Errors as the HTTP API reports them: the one place that maps failures to a status code and an error body.

Every error response is `{"error": {"type": ..., "message": ...}}` (OpenAI's shape), so clients of either API can
handle them the same way. Ignores where the errors come from.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from llmaas.engine.scheduler import QueueFullError
from llmaas.errors import (
    CallCancelled,
    ContextLengthError,
    ElasticUnavailableError,
    InvalidRequestError,
    LlmaasError,
    NotFoundError,
    ShuttingDownError,
    SloUnreachableError,
    StorageError,
    UnsupportedModelError,
)
from llmaas.storage.catalog import QuotaError

RETRY_AFTER_S = 1


class ApiError(LlmaasError):
    """An error raised by the HTTP layer itself (authentication, unknown model, bad content type...)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                   code: str | None = None) -> JSONResponse:
    body: dict = {"type": kind, "message": message}
    if code is not None:
        body["code"] = code
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def to_response(exc: LlmaasError) -> JSONResponse:
    """The status, error type and headers for each failure, most specific first."""
    if isinstance(exc, ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.kind, str(exc), headers)
    if isinstance(exc, QueueFullError):
        return error_response(429, "rate_limit_error", str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, QuotaError):
        return error_response(403, "quota_exceeded_error", str(exc))
    if isinstance(exc, NotFoundError):
        return error_response(404, "not_found_error", str(exc))
    if isinstance(exc, SloUnreachableError):
        return error_response(400, "invalid_request_error", str(exc), code="slo_unreachable")
    if isinstance(exc, ElasticUnavailableError):
        # a 4xx, not 503: retrying will not help; the operator must build and enable the sub-models
        return error_response(409, "elastic_unavailable", str(exc))
    if isinstance(exc, ContextLengthError):
        return error_response(400, "invalid_request_error", str(exc), code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError | UnsupportedModelError):
        return error_response(400, "invalid_request_error", str(exc))
    if isinstance(exc, ShuttingDownError):
        return error_response(503, "service_unavailable", str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, CallCancelled):
        return error_response(499, "cancelled", str(exc))
    if isinstance(exc, StorageError):  # the operator's disk, not the request: 507 Insufficient Storage
        return error_response(507, "storage_error", str(exc))
    return error_response(500, "server_error", str(exc))
