"""The attention-sink window (LLMS §1.2, StreamingLLM): which token ids a context keeps when a call would overflow.

When a call's context, new prompt and reply would pass the context limit, the context keeps its first tokens (the
attention sinks: one KV chunk) and its most recent ones, about half the limit, so that the next slide is hundreds of
tokens away (llama.cpp's context shift also keeps half). A prompt longer than the room left loses its start (it is
left-truncated). The retained ids become the context's ids, at positions 0.. (re-based): the context's KV is then
always a plain prefill of its ids, so restore, recompute, crash recovery and the equivalence tests need nothing new.
Keeping the old absolute positions instead would save nothing: every retained token's K and V were computed while
attending to the tokens that leave, so they must be recomputed over the window anyway (the store does: its chunks
past the sinks no longer match the ids). Owns this arithmetic on ids only; ignores KV (the store) and text (the
catalogue keeps every message, also those that left the window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmaas.errors import ContextLengthError

KEEP_FRACTION = 0.5  # of the limit, kept after a slide: history vs how often the window re-prefills


@dataclass(frozen=True)
class Window:
    held: list[int]  # leading retained ids from the committed context: the store makes their KV resident
    prompt: list[int]  # the rest of the retained ids: this call's prompt (prefilled by the generation)
    dropped_tokens: int  # ids of the context and the prompt that left the window in this call
    truncated_prompt_tokens: int  # of those, how many came from the start of the new prompt

    @property
    def retained_tokens(self) -> int:
        return len(self.held) + len(self.prompt)


def fit(base: Sequence[int], prompt: Sequence[int], limit: int, reply_tokens: int, closing_tokens: int,
        sink_tokens: int) -> Window:
    """The ids a call runs on: base + prompt when they fit with `reply_tokens` of reply room and the turn's closing
    ids, else the first `sink_tokens` plus the most recent ids of base + prompt (see the module docstring)."""
    stream = [*base, *prompt]
    reply = max(1, min(reply_tokens, limit // 2))  # a huge max_tokens must not push the whole history out
    capacity = limit - closing_tokens - reply  # the ids that may precede the reply
    if len(stream) <= capacity:
        return Window(list(base), list(prompt), 0, 0)
    sinks = min(sink_tokens, len(stream))
    if capacity <= sinks:
        raise ContextLengthError(f"a context limit of {limit} tokens leaves no room for a window of {sinks} sink "
                                 f"tokens, the turn's markup and a reply; raise the app's max_context_tokens")
    keep = min(capacity, max(int(limit * KEEP_FRACTION), sinks + len(prompt)))
    cut = len(stream) - (keep - sinks)  # stream[sinks:cut] leaves the window
    retained = stream[:sinks] + stream[cut:]
    held = min(sinks, len(base)) + max(0, len(base) - cut)
    return Window(retained[:held], retained[held:], cut - sinks, max(0, cut - max(sinks, len(base))))
