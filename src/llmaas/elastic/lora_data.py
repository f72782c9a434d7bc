"""Training examples for LoRA recovery: Alpaca instructions (loss on the response only) mixed with plain prose
windows (loss on every token), tokenized, cut, and split into train and held-out parts deterministically.

Why prose too: pruning removes general language-modelling ability, not instruction following, and the Alpaca here
is a 2,000-example sample; XSum news documents (not an evaluation set) restore the former. The mix is a knob
(`text_fraction`); the report states the sources. Ignores batching order and the optimizer (lora_train.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llmaas.elastic.calibration import CALIBRATION_SOURCE
from llmaas.model.tokenizer import Tokenizer
from llmaas.paths import SHARED_DATA_DIR
from llmaas.shared_data import read_jsonl

ALPACA_SOURCE = "alpaca/train_sample.jsonl"
TEXT_SOURCE = CALIBRATION_SOURCE  # the calibration windows are 10 x 64 tokens of 800 documents; overlap is noise
PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass(frozen=True, eq=False)
class Example:
    ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # bool [T]: tokens that are targets


def alpaca_examples(tokenizer: Tokenizer, cutoff_tokens: int) -> list[Example]:
    out = []
    eos = tokenizer.special.eos_id
    for row in read_jsonl(SHARED_DATA_DIR / ALPACA_SOURCE):
        has_input = bool(row["input"].strip())
        prompt = PROMPT.format(ctx=", paired with an input that provides further context" if has_input else "",
                               instruction=row["instruction"],
                               input=f"### Input:\n{row['input']}\n\n" if has_input else "")
        p = tokenizer.encode(prompt)
        r = tokenizer.encode(row["output"], add_bos=False) + ([eos] if eos is not None else [])
        ids = (p + r)[:cutoff_tokens]
        mask = ([False] * len(p) + [True] * len(r))[:cutoff_tokens]
        if any(mask[1:]):
            out.append(Example(torch.tensor(ids), torch.tensor(mask)))
    return out


def text_examples(tokenizer: Tokenizer, cutoff_tokens: int) -> list[Example]:
    out = []
    for row in read_jsonl(SHARED_DATA_DIR / TEXT_SOURCE):
        ids = tokenizer.encode(row["document"])
        for start in range(0, len(ids) - cutoff_tokens // 2, cutoff_tokens):
            window = ids[start:start + cutoff_tokens]
            out.append(Example(torch.tensor(window), torch.ones(len(window), dtype=torch.bool)))
    return out


@dataclass(frozen=True, eq=False)
class Split:
    train: list[Example]
    held_out: list[Example]


def make_split(tokenizer: Tokenizer, cutoff_tokens: int, text_fraction: float, held_out: int, seed: int) -> Split:
    """Train and held-out examples; held_out of each source (half and half by text_fraction) are never trained on."""
    rng = random.Random(seed)
    alpaca, text = alpaca_examples(tokenizer, cutoff_tokens), text_examples(tokenizer, cutoff_tokens)
    rng.shuffle(alpaca)
    rng.shuffle(text)
    n_text_held = round(held_out * text_fraction)
    n_alpaca_held = held_out - n_text_held
    held = alpaca[:n_alpaca_held] + text[:n_text_held]
    alpaca, text = alpaca[n_alpaca_held:], text[n_text_held:]
    # interleave so every micro-batch mixes both sources at the requested fraction
    train, a, t = [], 0, 0
    while a < len(alpaca) and t < len(text):
        if (t + 1) <= text_fraction * (len(train) + 1):
            train.append(text[t])
            t += 1
        else:
            train.append(alpaca[a])
            a += 1
    return Split(train, held)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and loss mask [B, T] (padding never counts; causal attention never sees it)."""
    t = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(examples), t), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = e.loss_mask
    return ids, mask
