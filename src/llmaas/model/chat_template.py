"""The chat template stored in a GGUF (`tokenizer.chat_template`), rendered with jinja2 the way HF does.

Owns message validation and rendering (sandboxed, trim_blocks/lstrip_blocks, `raise_exception`, bos/eos variables).
Ignores tokenization: the rendered prompt is tokenized with special tokens parsed, so the template's markers become
their control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmaas.errors import InvalidRequestError, UnsupportedModelError
from llmaas.model.gguf_file import GGUFFile

ROLES = ("system", "user", "assistant")


def _raise(message: str) -> None:
    raise InvalidRequestError(f"the chat template refused the messages: {message}")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise UnsupportedModelError(f"the model's chat template does not parse: {exc}") from exc
        self.source = source
        self._bos, self._eos = bos_token, eos_token

    @classmethod
    def from_gguf(cls, f: GGUFFile, bos_token: str, eos_token: str) -> ChatTemplate | None:
        source = f.get("tokenizer.chat_template", None)
        return cls(source, bos_token, eos_token) if source else None

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise InvalidRequestError(f"message {i} must be an object with exactly 'role' and 'content'")
            if m["role"] not in ROLES or not isinstance(m["content"], str):
                raise InvalidRequestError(f"message {i}: role must be one of {ROLES} and content a string")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self._bos, eos_token=self._eos)
        except TemplateError as exc:
            raise InvalidRequestError(f"the chat template failed on these messages: {exc}") from exc
