"""`llmaas.Client`: the Python face of the service's contexts API, over its Unix socket (default) or TCP.

Owns the wire: JSON requests, SSE parsing for streamed calls, and turning error bodies back into ServiceError with the
service's status, type and message. Mirrors the LLMS API: new_context / call / get / list / delete (+ stats).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llmaas.errors import LlmaasError
from llmaas.paths import DataDir


class ServiceError(LlmaasError):
    """The service refused a request: `status` (HTTP), `kind` (the error type) and its message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{message} [{status} {kind}]")
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class CallReply:
    context_id: str | None
    reply: str
    finish_reason: str
    usage: dict[str, int]
    timings: dict[str, float]
    window: dict[str, int] | None = None  # set when the context's window slid: what left it (WindowOut)
    notice: str | None = None  # set when the caller must act or should know, e.g. finish_reason "context_full"


class Client:
    def __init__(self, key: str, *, socket: str | Path | None = None, base_url: str | None = None,
                 timeout_s: float = 600.0) -> None:
        """Connect with an app key, to `base_url` (e.g. http://127.0.0.1:8080) or else the Unix socket (default:
        the one in $LLMAAS_HOME)."""
        if base_url is None:
            path = Path(socket) if socket is not None else DataDir.resolve().socket
            transport = httpx.HTTPTransport(uds=str(path))
            base_url = "http://llmaas"
        else:
            transport = httpx.HTTPTransport()
        self._http = httpx.Client(transport=transport, base_url=base_url, timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ServiceError(503, "unavailable", f"cannot reach the llmaas service ({exc}); is `llmaas serve` "
                                                   "running on this data directory?") from exc
        if r.status_code >= 400:
            _raise_for(r.status_code, r.content)
        return r.json()

    # -- the LLMS API --------------------------------------------------------------------------------------------

    def new_context(self, system_prompt: str | None = None, overflow: str = "window") -> str:
        """Create a context; returns its id. overflow: past the maximum length, "window" keeps the first and the
        most recent tokens and goes on, "error" refuses further calls."""
        body = {"system_prompt": system_prompt, "overflow": overflow}
        return self._request("POST", "/v1/contexts", json=body)["id"]

    def call(self, context_id: str, prompt: str, **generation: Any) -> CallReply:
        """Append `prompt` as a user turn and return the reply (generation: max_tokens, temperature, top_p, top_k,
        seed, stop)."""
        body = self._request("POST", f"/v1/contexts/{context_id}/calls", json={"prompt": prompt, **generation})
        return CallReply(**body)

    def stream(self, context_id: str, prompt: str, **generation: Any) -> Iterator[str | CallReply]:
        """Like call(), but yields the reply's text pieces as they come, then the CallReply."""
        payload = {"prompt": prompt, "stream": True, **generation}
        try:
            with self._http.stream("POST", f"/v1/contexts/{context_id}/calls", json=payload) as r:
                if r.status_code >= 400:
                    _raise_for(r.status_code, r.read())
                event = None
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        if event == "delta":
                            yield data["text"]
                        elif event == "done":
                            yield CallReply(**data)
                        elif event == "error":  # after the 200: the status it stands for is in the event
                            _raise_for(int(data.get("error", {}).get("status", 500)), json.dumps(data).encode())
        except httpx.TransportError as exc:
            raise ServiceError(503, "unavailable", f"lost the llmaas service mid-call ({exc})") from exc

    def get(self, context_id: str) -> dict:
        """The context's messages, token count and residency."""
        return self._request("GET", f"/v1/contexts/{context_id}")

    def list(self) -> list[dict]:
        return self._request("GET", "/v1/contexts")["data"]

    def delete(self, context_id: str) -> None:
        self._request("DELETE", f"/v1/contexts/{context_id}")

    def stats(self) -> dict:
        return self._request("GET", "/v1/stats")


def _raise_for(status: int, content: bytes) -> None:
    try:
        err = json.loads(content)["error"]
        raise ServiceError(status, err.get("type", "error"), err.get("message", ""))
    except (ValueError, KeyError, TypeError):
        raise ServiceError(status, "error", content.decode(errors="replace")[:500]) from None
