"""A persistent context's turns as exact token ids, built incrementally with the model's chat template.

Owns the token arithmetic of a call: on a context's first call, the tokens of its whole rendering (system prompt, or
the template's default one, + user turn + generation prompt), exactly as a stateless chat; on later calls, that
rendering minus the rendering of the history; after the reply, the template's closing text for the
assistant turn (ChatML: "<|im_end|>\\n") is appended. The ids of earlier turns are never re-tokenized (a concatenated
text can tokenize differently), so a context's KV always matches its stored ids. Models without a chat template
continue raw text. Ignores generation and storage.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from llmaas.errors import UnsupportedModelError
from llmaas.model.chat_template import ChatTemplate
from llmaas.model.tokenizer import Tokenizer
from llmaas.records import Message


class Conversation:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        # Message text is data, never markup: the template's own markers become control tokens, but a marker typed
        # inside a message ("<|im_start|>system ...") must stay plain text, or any user could forge a system turn.
        # Contents are rendered between two sentinels, random per process so no message can contain them, and the
        # text between them is encoded without parsing special tokens.
        tag = secrets.token_hex(8)
        self._open, self._close = f"\ue000{tag}\ue001", f"\ue001{tag}\ue000"
        self._content = re.compile(re.escape(self._open) + "(.*?)" + re.escape(self._close), re.DOTALL)

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        """The template's rendering, each message's content between the sentinels (see _encode)."""
        assert self.template is not None
        return self.template.render([{"role": m.role, "content": self._data(m.content)} for m in messages],
                                    add_generation_prompt=add_generation_prompt)

    def _data(self, content: str) -> str:
        return self._open + content + self._close

    def _encode(self, rendered: str, add_bos: bool | None) -> list[int]:
        """Token ids of a rendered piece: markup with its control tokens, message contents as plain text."""
        ids = self.tokenizer.encode("", add_bos=add_bos) if add_bos is not False else []
        pieces = self._content.split(rendered)  # markup, content, markup, ..., markup
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer.encode(piece, add_bos=False, parse_special=i % 2 == 0)
        return ids

    def _suffix(self, longer: str, prefix: str) -> str:
        if not longer.startswith(prefix):
            raise UnsupportedModelError(
                "this model's chat template does not render conversations incrementally, which persistent contexts "
                "need; use stateless chat completions instead"
            )
        return longer[len(prefix):]

    def prompt_ids(self, history: Sequence[Message], user: str, *, starts_context: bool) -> list[int]:
        """Tokens to append for a new user turn, up to where the assistant's reply begins. A context's first call
        tokenizes its whole history (the system prompt, or the template's default one), exactly as the stateless path
        would: nothing before it was ever tokenized."""
        if starts_context:
            return self.chat_ids([*history, Message("user", user)])
        if self.template is None:
            return self.tokenizer.encode(user, add_bos=False, parse_special=False)
        text = self._suffix(self._render([*history, Message("user", user)], True), self._render(history, False))
        return self._encode(text, add_bos=False)

    def closing_ids(self, history: Sequence[Message], user: str, reply: str) -> list[int]:
        """Tokens that close the assistant turn after its reply text (the end-of-turn marker and separator)."""
        if self.template is None:
            return []
        opened = self._render([*history, Message("user", user)], True) + self._data(reply)
        closed = self._render([*history, Message("user", user), Message("assistant", reply)], False)
        return self._encode(self._suffix(closed, opened), add_bos=False)

    def close_turn(self, history: Sequence[Message], user: str, base: Sequence[int], prompt: Sequence[int],
                   generated: Sequence[int], text: str, cached_tokens: int) -> tuple[list[int], int]:
        """The context's ids after a turn (base + prompt + reply + closing), and how many of them the KV, which holds
        the first `cached_tokens` of base + prompt + generated, already covers. A reply cut by a stop string keeps
        its text's tokens."""
        reply = list(generated)
        if self.tokenizer.decode(reply) != text:
            reply = self.tokenizer.encode(text, add_bos=False, parse_special=False)
        new_ids = [*base, *prompt, *reply, *self.closing_ids(history, user, text)]
        forwarded = [*base, *prompt, *generated][:cached_tokens]
        return new_ids, common_prefix(forwarded, new_ids)

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """A whole stateless conversation, ready for the assistant's reply."""
        if self.template is None:
            return self.tokenizer.encode("\n".join(m.content for m in messages), parse_special=False)
        return self._encode(self._render(messages, True), add_bos=None)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two sequences share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
