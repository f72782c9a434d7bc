"""The plain records every layer passes around: an app, a chat message, a persistent context.

Owns their shape only (and OVERFLOW_MODES, the values a context's overflow may take). The catalogue stores and
returns them; the engine and the service read them; none of those needs the others to name them. Ignores where they
are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

OVERFLOW_MODES = ("window", "error")


@dataclass(frozen=True)
class App:
    id: int
    name: str
    max_contexts: int
    max_context_tokens: int
    created_at: float
    max_pending: int | None = None  # None: the service's default queue bound per app


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ContextRecord:
    id: str
    app_id: int
    messages: tuple[Message, ...]
    token_ids: tuple[int, ...]  # exactly the ids the context's KV covers once resident (its window, once it slid)
    num_calls: int
    created_at: float
    updated_at: float
    overflow: str = "window"  # past the limit: "window" (attention-sink window) or "error" (calls are refused)
    dropped_tokens: int = 0  # ids that left the window so far; the messages keep all the text
