"""Score-head labels made by the resident LLM itself (ELASTILM.md §6, LLMLingua-style): training text cut into
segments, per LLM token its self-information under the full model, per word the mean over its tokens, and *keep* for
the top half of each segment's words.

Owns which shared-data files are training text (train splits and general text only, never an evaluation split), the
segment cut (<= 256 encoder tokens with the SLO prefix), the word <-> LLM-token mapping (each word is encoded with
its own preceding whitespace, so every LLM token belongs to exactly one word by construction) and the resumable
on-disk cache (one JSON line per labelled segment). Ignores the encoder's tokens beyond counting them (score_train.py
maps word labels onto them through character offsets).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.loader import LoadedModel
from llmaas.paths import SHARED_DATA_DIR
from llmaas.prompt.words import split_words
from llmaas.shared_data import read_jsonl

# (folder/file, fields joined into one text). Train splits and general text only. Left out on purpose: the
# multiple-choice evaluation sets (arc_easy, openbookqa, sciq, mmlu, elastilm_*), even their train splits, so no
# evaluation question's wording is ever seen; wikitext2 (only its test split is here, and it is the perplexity
# evaluation text); the ag_news and sst2 eval splits. xsum and cnn_dailymail hold only the 80% of their test splits
# that the LLMS traces do not hold out: they are not ElastiLM evaluation items.
TRAINING_FILES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("alpaca/train_sample.jsonl", ("instruction", "input", "output")),
    ("samsum/validation.jsonl", ("document",)),
    ("ag_news/train_sample.jsonl", ("text",)),
    ("xsum/test.jsonl", ("document",)),
    ("cnn_dailymail/test.jsonl", ("document",)),
    ("sharegpt/conversations_sample.jsonl", ("conversations",)),
)
SEGMENT_TOKENS = 256  # encoder tokens per training input: [CLS] [pre] [dec] segment [SEP]
_LAYOUT_TOKENS = 4  # [CLS], the two SLO tokens, [SEP]
MIN_SEGMENT_WORDS = 24  # shorter pieces (a tweet-length news item) teach little about relative importance


@dataclass(frozen=True)
class Segment:
    key: str  # hash of the text: the cache key, stable across runs and scales
    source: str
    text: str


@dataclass(frozen=True)
class SegmentLabels:
    key: str
    word_scores: list[float]  # mean self-information (nats) of each word's LLM tokens
    keep: list[bool]  # per word: in the top keep_ratio of its segment
    num_llm_tokens: int


def training_texts(data_dir: Path = SHARED_DATA_DIR) -> dict[str, list[str]]:
    """Per source file, its texts (fields joined by blank lines; chat turns by newlines)."""
    out = {}
    for name, fields in TRAINING_FILES:
        texts = []
        for row in read_jsonl(data_dir / name):
            parts = []
            for field in fields:
                value = row.get(field) or ""
                if isinstance(value, list):  # chat turns
                    value = "\n".join(f"{t.get('role', '')}: {t.get('content', '')}" for t in value)
                parts.append(value.strip())
            text = "\n\n".join(p for p in parts if p)
            if text:
                texts.append(text)
        out[name] = texts
    return out


def cut_segments(texts: list[str], count_tokens: Callable[[str], int], max_tokens: int) -> Iterator[str]:
    """Consecutive runs of whole words of each text, each at most max_tokens encoder tokens (the word counts add up
    because WordPiece pre-splits at whitespace), at least MIN_SEGMENT_WORDS words."""
    for text in texts:
        words, start, used = split_words(text), 0, 0
        for i, w in enumerate(words):
            n = count_tokens(w.text)
            if used + n > max_tokens and i > start:
                if i - start >= MIN_SEGMENT_WORDS:
                    yield text[words[start].start:words[i - 1].end]
                start, used = i, 0
            used += n
        if words and len(words) - start >= MIN_SEGMENT_WORDS:
            yield text[words[start].start:words[-1].end]


def make_segments(num_segments: int, count_tokens: Callable[[str], int], data_dir: Path = SHARED_DATA_DIR,
                  seed: int = 0) -> list[Segment]:
    """num_segments segments drawn round-robin over the sources (so a small run still sees every kind of text),
    each source's segments in a seeded random order. Deterministic for a given data directory."""
    rng = random.Random(seed)
    pools = []
    for name, texts in training_texts(data_dir).items():
        texts = texts[:]
        rng.shuffle(texts)
        pools.append((name, cut_segments(texts, count_tokens, SEGMENT_TOKENS - _LAYOUT_TOKENS)))
    out: list[Segment] = []
    while pools and len(out) < num_segments:
        for entry in list(pools):
            name, it = entry
            text = next(it, None)
            if text is None:
                pools.remove(entry)
                continue
            out.append(Segment(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), name, text))
            if len(out) == num_segments:
                break
    return out


def word_token_ids(loaded: LoadedModel, text: str) -> list[list[int]]:
    """Per word of text, its LLM tokens: the word encoded with its preceding whitespace. Concatenated they are the
    LLM's input, so each token belongs to exactly one word (never indexed through another tokenizer)."""
    return [loaded.tokenizer.encode(w.before + w.text, add_bos=False, parse_special=False) for w in split_words(text)]


@torch.no_grad()
def self_information(loaded: LoadedModel, ids: list[int]) -> list[float]:
    """-log p(x_t | x_<t) for every token of ids (after BOS) under the full model, no LoRA, one prefill."""
    bos = loaded.tokenizer.special.bos_id
    x = ([bos] if bos is not None else []) + ids
    cache = DenseKVCache(KVSpec.from_config(loaded.config), len(x), dtype=torch.float32)
    logits = loaded.model.forward(torch.tensor(x), torch.arange(len(x)), cache.append(len(x)))
    logp = torch.log_softmax(logits.float(), dim=-1)  # [len(x), vocab]
    first = len(x) - len(ids)  # without BOS the first token has no context: it gets the mean (below)
    target = torch.tensor(x[max(first, 1):])
    s = (-logp[max(first, 1) - 1:-1].gather(1, target[:, None])[:, 0]).tolist()
    return ([sum(s) / len(s)] if first == 0 and s else []) + s


def keep_top(scores: list[float], keep_ratio: float) -> list[bool]:
    """True for the floor(n·ratio) highest scores (ties broken by position, so exactly that many)."""
    n_keep = math.floor(len(scores) * keep_ratio)
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = set(ranked[:n_keep])
    return [i in kept for i in range(len(scores))]


def label_segment(loaded: LoadedModel, segment: Segment, keep_ratio: float = 0.5) -> SegmentLabels:
    per_word = word_token_ids(loaded, segment.text)
    s = self_information(loaded, [t for ids in per_word for t in ids])
    scores, i = [], 0
    for ids in per_word:
        scores.append(sum(s[i:i + len(ids)]) / len(ids) if ids else 0.0)
        i += len(ids)
    assert i == len(s), "every LLM token belongs to exactly one word"
    return SegmentLabels(segment.key, scores, keep_top(scores, keep_ratio), len(s))


def labels_path(directory: Path) -> Path:
    return directory / "score_labels" / "labels.jsonl"


def load_labels(path: Path) -> dict[str, SegmentLabels]:
    """Labels cached so far; a torn last line (a killed run) is ignored and relabelled."""
    out: dict[str, SegmentLabels] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            out[row["key"]] = SegmentLabels(row["key"], row["word_scores"], row["keep"], row["num_llm_tokens"])
    return out


def label_segments(loaded: LoadedModel, segments: list[Segment], path: Path, keep_ratio: float = 0.5,
                   log: Callable[[str], None] = print) -> dict[str, SegmentLabels]:
    """Labels for every segment, computing only those not already in the cache file (appended one line each)."""
    done = load_labels(path)
    todo = [s for s in segments if s.key not in done]
    log(f"labels: {len(segments) - len(todo)}/{len(segments)} segments cached, {len(todo)} to label")
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f:
        for n, seg in enumerate(todo, 1):
            lab = label_segment(loaded, seg, keep_ratio)
            f.write(json.dumps({"key": lab.key, "source": seg.source, "word_scores": lab.word_scores,
                                "keep": lab.keep, "num_llm_tokens": lab.num_llm_tokens}) + "\n")
            f.flush()
            done[lab.key] = lab
            if n % 10 == 0 or n == len(todo):
                elapsed = time.perf_counter() - started
                log(f"labels: {n}/{len(todo)} ({elapsed:.0f} s, {elapsed / n:.2f} s/segment, ETA "
                    f"{elapsed / n * (len(todo) - n):.0f} s)")
    return {s.key: done[s.key] for s in segments}
