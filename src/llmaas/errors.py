"""Typed errors raised at llmaas's boundaries. Each message names the cause and what the caller can do about it."""

from __future__ import annotations


class LlmaasError(Exception):
    """Base of every error llmaas raises on purpose."""


class ModelFileError(LlmaasError):
    """The model file is missing, unreadable, truncated or not a GGUF."""


class UnsupportedModelError(LlmaasError):
    """The GGUF is readable but uses an architecture, tensor type or tokenizer llmaas does not implement."""


class ContextLengthError(LlmaasError):
    """A prompt (plus what must be generated) does not fit the context limit."""


class InvalidRequestError(LlmaasError):
    """A request parameter is out of range or of the wrong kind."""


class KernelBuildError(LlmaasError):
    """The native kernels could not be compiled or loaded."""


class NotFoundError(LlmaasError):
    """The named object does not exist (or belongs to another app, which is indistinguishable)."""


class CallCancelled(LlmaasError):
    """The caller went away (or cancelled) before the call finished; nothing was committed."""


class ServiceStartError(LlmaasError):
    """The service cannot start (data directory in use, socket path unusable, port taken, exited while starting)."""


class ShuttingDownError(LlmaasError):
    """The service is stopping and will not run this call; retry when it is back."""


class SloUnreachableError(InvalidRequestError):
    """No elastic configuration can meet the request's SLO on this prompt; the message gives the floor."""


class ElasticUnavailableError(LlmaasError):
    """Elastic requests cannot run here: the service was started without them or their artifacts are not built."""


class StorageError(LlmaasError):
    """The data directory cannot take a write (disk full, read-only, failing): nothing of the request was saved."""
