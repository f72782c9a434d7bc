"""Word-level prompt compression (ElastiLM §6): whole original words with their case and newlines, the token budget
met within one word, and the question and choices never touched; scores mapped from another tokenizer's offsets."""

from __future__ import annotations

import random

import pytest

from llmaas.prompt.compress import compress
from llmaas.prompt.words import rebuild, split_words, word_scores

CONTEXT = ("Answer the Question.\n\nExample: The Moon orbits the Earth; the Earth orbits the Sun.\n"
           "Answer: B\n\n  Tokyo is the CAPITAL of Japan, and Kyoto was before it.\n")


def test_words_keep_whitespace_case_and_rebuild_exactly():
    words = split_words(CONTEXT)
    assert rebuild(CONTEXT, words, range(len(words))) == CONTEXT
    assert [w.text for w in words[:3]] == ["Answer", "the", "Question."]
    kept = rebuild(CONTEXT, words, [0, 3, 11])
    assert kept == "Answer" + words[3].before + words[3].text + words[11].before + words[11].text + "\n"


@pytest.mark.parametrize("target", [5, 12, 20, 31])
def test_compression_keeps_whole_original_words_within_one_word_of_the_budget(smollm, target):
    count = lambda text: len(smollm.tokenizer.encode(text, add_bos=False, parse_special=False))  # noqa: E731
    words = split_words(CONTEXT)
    scores = [random.Random(i).random() for i in range(len(words))]
    question, choices = "Question: What is the capital of Japan?\nAnswer:", [" Tokyo", " Kyoto"]
    before = (question, list(choices))
    out = compress(CONTEXT, scores, target, count)
    assert out.original_tokens == count(CONTEXT) and out.tokens == count(out.text)
    kept_texts = [w.text for w in split_words(out.text)]
    assert set(kept_texts) <= {w.text for w in words}  # whole words, original case
    # the highest-scored words, in their original order
    ranked = sorted(range(len(words)), key=lambda i: -scores[i])[:out.kept_words]
    assert kept_texts == [words[i].text for i in sorted(ranked)]
    biggest_word = max(count(w.before + w.text) for w in words)
    assert target - biggest_word - 1 <= out.tokens <= target + 1  # within one word (and a seam merge) of the budget
    assert (question, choices) == before  # the query is not an input: byte-identical by construction


def test_compression_keeps_newlines_of_kept_words_and_everything_when_it_fits(smollm):
    count = lambda text: len(smollm.tokenizer.encode(text, add_bos=False, parse_special=False))  # noqa: E731
    words = split_words(CONTEXT)
    chosen = [w for w in words if w.text in ("Answer:", "B", "Tokyo")]
    scores = [1.0 if w in chosen else 0.0 for w in words]
    out = compress(CONTEXT, scores, sum(count(w.before + w.text) for w in chosen), count)
    assert out.text == "Answer: B\n\n  Tokyo\n"  # each kept word brings its own preceding whitespace
    assert compress(CONTEXT, scores, 10_000, count).text == CONTEXT
    with pytest.raises(ValueError):
        compress(CONTEXT, scores[:-1], 4, count)


def test_word_scores_come_through_character_offsets_not_positions():
    text = "Hello wonderful world"
    words = split_words(text)
    # a tokenizer that splits "wonderful" in two and emits a special token with an empty span
    offsets = [(0, 0), (0, 5), (6, 11), (11, 15), (16, 21)]
    scores = [99.0, 1.0, 2.0, 4.0, 8.0]
    assert word_scores(words, offsets, scores) == [1.0, 3.0, 8.0]
    assert word_scores(words, offsets[:3], scores[:3])[2] == float("-inf")  # truncated away: kept last


def test_forced_words_are_kept_past_the_budget_and_line_breaks_survive_dropped_words(smollm):
    """The LLMLingua-2 baseline's forced "?" and "\\n" (ELASTILM.md §10.2) through the same word-level selection."""
    count = lambda text: len(smollm.tokenizer.encode(text, add_bos=False, parse_special=False))  # noqa: E731
    context = "Alpha beta gamma\ndelta why? epsilon\nzeta eta"
    words = split_words(context)
    scores = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]  # "beta" and "eta" score highest
    forced = ["?" in w.text for w in words]
    out = compress(context, scores, count(" why?") + count(" eta"), count, forced=forced, keep_newlines=True)
    assert out.text == "why?\neta"  # the forced word first, then by score; the break of the dropped "zeta"
    assert compress(context, scores, 1, count, forced=forced).text == "why?"  # forced even past the budget
    assert compress(context, scores, count(" eta"), count).text == "eta"  # without them: the budget alone
    assert compress(context, scores, count(" beta eta"), count, keep_newlines=True).text == "beta\neta"
    with pytest.raises(ValueError):
        compress(context, scores, 4, count, forced=forced[:-1])
