"""Words of a text, as ElastiLM's compressor sees them (ELASTILM.md §6): maximal runs of non-whitespace characters,
each with the whitespace before it, so that a text rebuilt from any subset of its words keeps their original case,
spacing and newlines.

Owns the split, the rebuild, and the mapping of per-token scores from any tokenizer with character offsets onto
words (a word's score is the mean of the tokens that overlap it), so the encoder's positions never index the LLM's
tokens. Ignores where scores come from and how many words to keep (compress.py).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"(\s*)(\S+)")


@dataclass(frozen=True)
class Word:
    text: str
    before: str  # the whitespace that precedes it in the original (possibly newlines)
    start: int  # character offset of the word itself
    end: int


def split_words(text: str) -> list[Word]:
    """The words of `text` in order; whitespace after the last word belongs to no word (see trailing())."""
    return [Word(m.group(2), m.group(1), m.start(2), m.end(2)) for m in _WORD.finditer(text)]


def trailing(text: str) -> str:
    """The whitespace after the last word (kept by a rebuild, so a context's final newline survives)."""
    return text[len(text.rstrip()):]


def rebuild(text: str, words: Sequence[Word], kept: Sequence[int], keep_newlines: bool = False) -> str:
    """`text` with only the words at indices `kept` (ascending), each with its own preceding whitespace; the first
    kept word keeps the text's leading whitespace, never a dropped word's. With keep_newlines, a kept word whose
    dropped predecessors spanned a line break is put on a new line (LLMLingua-2's forced "\n")."""
    out = []
    for n, i in enumerate(kept):
        w = words[i]
        before = words[0].before if n == 0 else w.before
        if keep_newlines and n and "\n" not in before and "\n" in text[words[kept[n - 1]].end:w.start]:
            before = "\n"
        out.append(before + w.text)
    return "".join(out) + trailing(text)


def word_scores(words: Sequence[Word], offsets: Sequence[tuple[int, int]], scores: Sequence[float]) -> list[float]:
    """Per word, the mean score of the tokens whose character span overlaps it (a tokenizer's offsets into the same
    text); a word no token covers (truncated away) scores -inf, so it is the last to be kept."""
    sums, counts = [0.0] * len(words), [0] * len(words)
    ends = [w.end for w in words]
    for (a, b), s in zip(offsets, scores, strict=True):
        k = bisect_right(ends, a)  # the first word that ends after the token starts
        while b > a and k < len(words) and words[k].start < b:  # special tokens have empty spans: skipped
            sums[k] += s
            counts[k] += 1
            k += 1
    return [sums[i] / counts[i] if counts[i] else float("-inf") for i in range(len(words))]
