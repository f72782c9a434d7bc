"""The calibration batch every offline score uses: 10 random 64-token windows of general English text, seed 42.

Owns the choice of text and windows. ElastiLM draws them from BookCorpus, which is not in ../shared/data; we use
the XSum documents (BBC news prose), because WikiText-2 here is the test split the perplexity evaluation reads.
Ignores what the batch is used for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llmaas.model.tokenizer import Tokenizer
from llmaas.paths import SHARED_DATA_DIR
from llmaas.shared_data import read_jsonl

CALIBRATION_SOURCE = "xsum/test.jsonl"


@dataclass(frozen=True)
class CalibrationConfig:
    num_samples: int = 10
    num_tokens: int = 64
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.num_tokens < 2:
            raise ValueError("calibration needs at least 1 sample of at least 2 tokens")


def calibration_batch(tokenizer: Tokenizer, config: CalibrationConfig | None = None) -> torch.Tensor:
    """int64 [num_samples, num_tokens]: one random window from each of num_samples random documents."""
    config = config or CalibrationConfig()
    docs = [row["document"] for row in read_jsonl(SHARED_DATA_DIR / CALIBRATION_SOURCE)]
    rng = random.Random(config.seed)
    rng.shuffle(docs)
    rows = []
    for doc in docs:
        ids = tokenizer.encode(doc)
        if len(ids) < config.num_tokens:
            continue
        start = rng.randrange(len(ids) - config.num_tokens + 1)
        rows.append(ids[start:start + config.num_tokens])
        if len(rows) == config.num_samples:
            return torch.tensor(rows, dtype=torch.int64)
    raise ValueError(f"{CALIBRATION_SOURCE} has fewer than {config.num_samples} documents of "
                     f"{config.num_tokens} tokens")
