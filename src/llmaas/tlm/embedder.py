"""Sentence embeddings with the tiny LM, as sentence-transformers computes them for all-MiniLM-L6-v2.

Owns the recipe (tokenize with truncation at 256, encode, mean-pool over the attention mask, L2-normalise) and the
batching: texts are sorted by length and cut into batches of bounded padded size, so short texts never pay for a long
one's padding, and the vectors come back in input order. Ignores where the texts come from and who waits for them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmaas.errors import UnsupportedModelError
from llmaas.tlm.config import EmbedConfig
from llmaas.tlm.encoder import BertEncoder
from llmaas.tlm.tokenizer import WordPieceTokenizer, pad_batch


@dataclass(frozen=True)
class SentenceEmbeddings:
    vectors: torch.Tensor  # [texts, hidden] float32, unit L2 norm, in input order
    num_tokens: int  # tokens encoded, [CLS] and [SEP] included, after truncation (OpenAI's prompt_tokens)


class SentenceEmbedder:
    def __init__(self, encoder: BertEncoder, tokenizer: WordPieceTokenizer, config: EmbedConfig,
                 load_s: float = 0.0) -> None:
        if config.max_seq_tokens > encoder.config.max_positions:
            raise UnsupportedModelError(f"max_seq_tokens {config.max_seq_tokens} is over the encoder's "
                                        f"{encoder.config.max_positions} positions")
        self.encoder, self.tokenizer, self.config, self.load_s = encoder, tokenizer, config, load_s

    @classmethod
    def load(cls, folder: Path, config: EmbedConfig | None = None) -> SentenceEmbedder:
        """The model in `folder` (paths.tiny_lm_dir() for the bundled one); `config` defaults to the folder's own
        sentence-transformers settings."""
        started = time.perf_counter()
        config = EmbedConfig.from_dir(folder) if config is None else config
        encoder = BertEncoder.load(folder)
        tokenizer = WordPieceTokenizer(folder / "tokenizer.json", config.max_seq_tokens)
        return cls(encoder, tokenizer, config, time.perf_counter() - started)

    @property
    def dimensions(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def nbytes(self) -> int:
        """The encoder's weights: an upper bound of what stays resident, as they are mapped from the file (see
        BertEncoder.load); the tokenizer's 30k-entry vocabulary is small beside them."""
        return self.encoder.nbytes

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> SentenceEmbeddings:
        rows = self.tokenizer.encode(texts)
        vectors = torch.empty((len(rows), self.dimensions), dtype=torch.float32)
        for batch in length_batches([len(r) for r in rows], self.config.max_batch_tokens):
            ids, mask = pad_batch([rows[i] for i in batch], self.encoder.config.pad_token_id)
            hidden = self.encoder.encode(ids, mask)[-1]
            vectors[batch] = F.normalize(mean_pool(hidden, mask), p=2, dim=1)
        return SentenceEmbeddings(vectors, sum(len(r) for r in rows))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [batch, tokens, dim], mask [batch, tokens] -> [batch, dim]: the mean over real tokens only."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def length_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, sorted by length and cut so that each batch's padded size (rows x its longest row)
    stays within max_batch_tokens; a row longer than the bound goes alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # sorted ascending, so lengths[i] is the longest row of the batch it joins
        if batches and (len(batches[-1]) + 1) * lengths[i] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
