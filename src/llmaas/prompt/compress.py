"""Word-level compression of the refinable context to a budget of LLM tokens (ELASTILM.md §6 and §8).

Owns the selection: words are added in descending score until the next one would pass the budget, then emitted in
their original order with their original whitespace and case. Only the refinable context is ever compressed: the
question and the choices are not inputs here, so they stay byte-identical. The realized size is measured with the
LLM's own tokenizer on the rebuilt text. Ignores where scores come from (the tiny LM's score head) and which ratio
to use (elastic/slo.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmaas.prompt.words import rebuild, split_words

CountTokens = Callable[[str], int]  # the LLM tokenizer's count for a piece of text


@dataclass(frozen=True)
class Compressed:
    text: str
    kept_words: int
    total_words: int
    tokens: int  # LLM tokens of `text`, measured
    original_tokens: int


def compress(context: str, scores: Sequence[float], target_tokens: int, count_tokens: CountTokens, *,
             forced: Sequence[bool] | None = None, keep_newlines: bool = False) -> Compressed:
    """Keep the highest-scored words of `context` (one score per word of split_words(context)) within
    `target_tokens` LLM tokens, in their original order. A word's cost is its LLM tokens with its whitespace, so
    the budget is met up to tokenizer merges at the seams (one word at most: the result is measured). Words marked
    `forced` are kept first, even past the budget; keep_newlines keeps line breaks across dropped words (both for
    the LLMLingua-2 baseline's forced "\n" and "?")."""
    words = split_words(context)
    if len(scores) != len(words) or (forced is not None and len(forced) != len(words)):
        raise ValueError(f"{len(scores)} scores for {len(words)} words")
    original = count_tokens(context)
    if target_tokens >= original:
        return Compressed(context, len(words), len(words), original, original)
    cost = [count_tokens(w.before + w.text) for w in words]
    must = forced or [False] * len(words)
    kept: list[int] = []
    used = 0
    for i in sorted(range(len(words)), key=lambda i: (not must[i], -scores[i], i)):  # ties keep the earlier word
        if used + cost[i] > target_tokens and not must[i]:
            break
        kept.append(i)
        used += cost[i]
    text = rebuild(context, words, sorted(kept), keep_newlines) if kept else ""
    return Compressed(text, len(kept), len(words), count_tokens(text) if text else 0, original)
