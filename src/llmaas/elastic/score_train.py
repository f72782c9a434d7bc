"""Training the dual-head TLM's score branch on the LLM's own labels (ELASTILM.md §6), and measuring it.

Owns the training examples (random SLO tokens + segment in the runtime layout, word labels carried onto encoder tokens
through character offsets), the by-segment held-out split, the loop (AdamW 5e-5, batch 16, token cross-entropy on
labelled tokens, at most `epochs` and at most a wall-time budget) and the held-out ROC AUC of the keep-logit, written
into the saved head's record. Ignores the decision branch (built, saved untrained) and how labels are made.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmaas.elastic.dual_head import (
    DualHeadTLM,
    DualHeadTokenizer,
    build_window,
    default_heads_path,
    encoder_fingerprint,
    save_heads,
)
from llmaas.elastic.score_labels import Segment, SegmentLabels, label_segments, labels_path, make_segments
from llmaas.elastic.slo import DECODE_SLOS, PREFILL_SLOS
from llmaas.model.loader import LoadedModel
from llmaas.paths import tiny_lm_dir
from llmaas.prompt.words import split_words
from llmaas.tlm.encoder import BertEncoder
from llmaas.tlm.tokenizer import pad_batch

IGNORE = -100  # cross_entropy's ignore_index: [CLS], SLO tokens, [SEP], padding carry no label


@dataclass(frozen=True)
class ScoreTrainConfig:
    epochs: int = 3
    budget_s: float = 360.0  # wall-time cap on the optimizer loop: the ~6 minutes a 2-core run can spare
    batch_size: int = 16
    lr: float = 5e-5
    held_out_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.held_out_fraction < 1 or self.budget_s <= 0:
            raise ValueError(f"invalid score-head training config: {self}")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # per encoder token: 1 keep, 0 drop, IGNORE
    hidden: torch.Tensor | None = field(default=None, repr=False)  # the frozen trunk's output [tokens, 384]


def token_labels(text: str, offsets: Sequence[tuple[int, int] | None], keep: Sequence[bool]) -> list[int]:
    """Each encoder token inherits the label of the word its span starts in (offsets into text, as the tokenizer
    gives them); tokens outside the text get IGNORE."""
    words = split_words(text)
    if len(words) != len(keep):
        raise ValueError(f"{len(keep)} word labels for {len(words)} words: labels of another text?")
    ends = [w.end for w in words]
    out = []
    for span in offsets:
        if span is None or span[1] <= span[0]:
            out.append(IGNORE)
            continue
        k = bisect_right(ends, span[0])  # the word that ends after the token starts
        out.append(int(keep[k]) if k < len(words) and words[k].start <= span[0] else IGNORE)
    return out


def make_examples(tok: DualHeadTokenizer, segments: Sequence[Segment], labels: dict[str, SegmentLabels],
                  rng: random.Random) -> list[Example]:
    """One example per segment, with random SLO tokens (the runtime layout, §7: the score head must not depend on
    them, and the decision branch will see the same inputs)."""
    out = []
    for seg in segments:
        w = build_window(tok, rng.choice(PREFILL_SLOS), rng.choice(DECODE_SLOS), seg.text)
        out.append(Example(w.ids, token_labels(seg.text, w.context_offsets, labels[seg.key].keep)))
    return out


def split_held_out(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) by whole segment, in a seeded random order, so no segment's words are on both sides."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(items) * fraction))
    return [items[i] for i in order[n_held:]], [items[i] for i in order[:n_held]]


@torch.no_grad()
def precompute_trunk(model: DualHeadTLM, examples: list[Example], batch_size: int = 16) -> None:
    """The frozen trunk's output once per example, kept unpadded: every epoch then runs only the upper 3 layers
    (forward and backward), about half the encoder's work."""
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, mask = pad_batch([e.ids for e in batch], model.config.pad_token_id)
        h = model.shared(ids, mask)
        for j, e in enumerate(batch):
            e.hidden = h[j, :len(e.ids)].clone()


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trunk states [b, t, 384] zero-padded, mask [b, t], labels [b, t] with IGNORE on padding)."""
    longest = max(len(e.ids) for e in examples)
    assert all(e.hidden is not None for e in examples), "precompute_trunk first"
    h = torch.zeros(len(examples), longest, examples[0].hidden.shape[1])
    mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.int64)
    for i, e in enumerate(examples):
        h[i, :len(e.ids)], mask[i, :len(e.ids)] = e.hidden, True
        labels[i, :len(e.ids)] = torch.tensor(e.labels)
    return h, mask, labels


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties count
    half), by the rank-sum (Mann-Whitney U) formula with average ranks for ties."""
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError("ROC AUC needs both positive and negative labels")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # 1-based average rank of the tie group
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


@torch.no_grad()
def held_out_auc(model: DualHeadTLM, examples: Sequence[Example], batch_size: int = 16) -> float:
    """ROC AUC of the keep-logit (class 1) against the labels, over every labelled token of the examples."""
    model.eval()
    scores: list[float] = []
    labels: list[int] = []
    for i in range(0, len(examples), batch_size):
        h, mask, y = collate(examples[i:i + batch_size])
        keep_logit = model.score(h, mask)[..., 1]
        real = y != IGNORE
        scores += keep_logit[real].tolist()
        labels += y[real].tolist()
    return roc_auc(scores, labels)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    epochs_done: float
    train_s: float
    final_loss: float


def train_score_branch(model: DualHeadTLM, train: list[Example], config: ScoreTrainConfig,
                       log: Callable[[str], None] = print) -> TrainResult:
    """AdamW on the score branch and head only (the decision branch is not touched); token cross-entropy over
    labelled tokens; stops after config.epochs or when the next step would pass config.budget_s."""
    params = list(model.score_layers.parameters()) + list(model.score_head.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr)
    rng = random.Random(config.seed)
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    started, step, loss_value, step_s = time.perf_counter(), 0, float("nan"), 0.0
    model.train()
    for epoch in range(config.epochs):
        order = train[:]
        rng.shuffle(order)
        for b in range(0, len(order), config.batch_size):
            elapsed = time.perf_counter() - started
            if elapsed + step_s > config.budget_s:
                log(f"train: wall-time budget {config.budget_s:.0f} s reached at step {step}/{total}")
                return TrainResult(step, step / steps_per_epoch, elapsed, loss_value)
            h, mask, y = collate(order[b:b + config.batch_size])
            logits = model.score(h, mask)  # [b, t, 2]
            loss = F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, loss_value = step + 1, loss.item()
            step_s = (time.perf_counter() - started) / step
            if step % 10 == 0 or step == total:
                log(f"train: epoch {epoch + 1}/{config.epochs} step {step}/{total} loss {loss_value:.4f} "
                    f"({step_s:.2f} s/step, ETA {step_s * (total - step):.0f} s)")
    model.eval()
    return TrainResult(step, step / steps_per_epoch, time.perf_counter() - started, loss_value)


def build_score_head(loaded: LoadedModel, directory: Path, num_segments: int, config: ScoreTrainConfig,
                     log: Callable[[str], None] = print) -> dict:
    """The whole offline step: segments, labels (cached, resumable), examples, training, held-out AUC; saves the
    heads with their record under `directory` and returns the record."""
    stages: dict[str, float] = {}
    t = time.perf_counter()
    folder = tiny_lm_dir()
    model = DualHeadTLM(BertEncoder.load(folder))
    tok = DualHeadTokenizer(folder / "tokenizer.json", model.base_vocab_size)
    segments = make_segments(num_segments, lambda w: len(tok.encode(w)[0]), seed=config.seed)
    stages["segments_s"] = time.perf_counter() - t
    log(f"segments: {len(segments)} ({dict(Counter(s.source for s in segments))})")
    t = time.perf_counter()
    labels = label_segments(loaded, segments, labels_path(directory), log=log)
    stages["labels_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train_segs, held_segs = split_held_out(segments, config.held_out_fraction, config.seed)
    rng = random.Random(config.seed)
    train, held = make_examples(tok, train_segs, labels, rng), make_examples(tok, held_segs, labels, rng)
    precompute_trunk(model, train + held)
    stages["trunk_s"] = time.perf_counter() - t
    auc_init = held_out_auc(model, held)
    log(f"held-out AUC at init (random head): {auc_init:.4f}")
    result = train_score_branch(model, train, config, log)
    stages["train_s"] = result.train_s
    t = time.perf_counter()
    auc = held_out_auc(model, held)
    stages["eval_s"] = time.perf_counter() - t
    words = [k for lab in labels.values() for k in lab.keep]
    tokens = [y for e in train + held for y in e.labels if y != IGNORE]
    record = {
        "llm": loaded.model_id, "segments": len(segments), "train_segments": len(train),
        "held_out_segments": len(held), "words": len(words), "word_keep_fraction": sum(words) / len(words),
        "encoder_tokens": len(tokens), "token_keep_fraction": sum(tokens) / len(tokens),
        "llm_tokens": sum(lab.num_llm_tokens for lab in labels.values()), "keep_ratio": 0.5,
        "epochs": config.epochs, "epochs_done": result.epochs_done, "steps": result.steps,
        "batch_size": config.batch_size, "lr": config.lr, "budget_s": config.budget_s,
        "final_loss": result.final_loss, "held_out_auc": auc, "held_out_auc_init": auc_init,
        "threads": torch.get_num_threads(), "stages_s": stages, "decision_branch": "untrained",
    }
    path = save_heads(model, default_heads_path(directory), encoder_fingerprint(folder), record)
    log(f"saved {path}")
    return record
