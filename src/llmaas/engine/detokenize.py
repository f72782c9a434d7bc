"""Incremental detokenization for streaming: text deltas that never split a UTF-8 character or a merged token.

Owns the prefix/read offsets trick (decode a short window, emit only the new, complete part). Ignores stop strings.
"""

from __future__ import annotations

from llmaas.model.tokenizer import Tokenizer


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were decoded last time, for context
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add a token and return the text it completes ("" while a multi-byte character is still partial)."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix:self._read])
        after = self._tok.decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back, less the bytes of a character the reply was cut inside (max_tokens reached
        mid-character): they would decode to U+FFFD, which no one wants at the end of a reply."""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        after = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):].rstrip("\ufffd")
