"""The tiny LM's WordPiece tokenizer (uncased BERT), from the folder's tokenizer.json with HF `tokenizers`.

Owns truncation ([CLS] and [SEP] kept) and padding of a batch to its longest row with an attention mask. Ignores
which texts go in one batch (the embedder sorts them by length).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llmaas.errors import ModelFileError


class WordPieceTokenizer:
    def __init__(self, path: Path, max_tokens: int) -> None:
        """Truncates every text to `max_tokens`, special tokens included: 256 for sentence embeddings (the model's
        max_seq_length), up to the encoder's 512 positions for raw encoding."""
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
            raise ModelFileError(f"cannot read the tokenizer {path}: {exc}") from exc
        # tokenizer.json ships with truncation at 128 and padding to a fixed 128: replace both with ours.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_tokens)
        self.max_tokens = max_tokens

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: [CLS] + WordPiece ids + [SEP], truncated to max_tokens."""
        # One text at a time: encode_batch would start tokenizers' own thread pool, a second pool beside PyTorch's
        # on 2 cores; a text takes tens of microseconds, next to milliseconds for its forward.
        return [self._tokenizer.encode(text).ids for text in texts]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [batch, longest] int64 padded with pad_id, and the mask [batch, longest] bool (True = real token)."""
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, :len(row)] = True
    return ids, mask
