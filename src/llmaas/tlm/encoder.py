"""The BERT encoder of the tiny LM in plain PyTorch, computing what HF's BertModel computes, weights from safetensors.

Owns the forward (embeddings: word + position + token type, LayerNorm; then per layer: self-attention under the
padding mask, residual and post-LayerNorm, exact-erf GELU FFN, residual and post-LayerNorm) and the hidden states of
every layer, so that heads can sit on any of them (ElastiLM's dual-head TLM shares the lower 3 layers). Ignores
tokenization, pooling and BERT's pooler (the NSP head, which sentence embeddings never use).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from llmaas.errors import InvalidRequestError, ModelFileError
from llmaas.tlm.config import BertConfig

# HF's parameter names (per layer, after `encoder.layer.{i}.`) -> ours. Anything else in the file must be listed in
# _UNUSED, so a file with an unexpected layout fails at load instead of running with missing weights.
_LAYER_NAMES = {
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "ffn_norm",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "embed_norm",
}
_UNUSED = ("pooler.", "embeddings.position_ids")


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ffn_up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.ffn_down = nn.Linear(c.intermediate_size, c.hidden_size)
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [batch, tokens, hidden]; key_mask [batch, 1, 1, tokens], True where a key is a real token."""
        b, t, h = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:  # [b, t, h] -> [b, heads, t, head_dim]
            return proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        # Padded query rows still see every real key (never an all-masked row, so no NaN); pooling drops them.
        attn = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value), attn_mask=key_mask)
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(b, t, h)))
        return self.ffn_norm(x + self.ffn_down(F.gelu(self.ffn_up(x))))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_positions, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))

    @classmethod
    def load(cls, folder: Path) -> BertEncoder:
        """The encoder of a sentence-transformers/HF BERT folder (config.json + model.safetensors), in eval mode
        and without gradients (a trainer turns them back on for what it trains). The weights stay mapped from the
        file (safetensors maps it copy-on-write): pages come in on first use, so rows of word embeddings that no
        text uses are never read, and the kernel may drop clean pages under memory pressure."""
        # Built with random weights that the file's replace (assign=True frees them at once): built on "meta"
        # instead, nn.Embedding's init imports torch's Python meta kernels (sympy...): +1.0 s and +78 MB resident for
        # good, against 0.1 s here (measured).
        encoder = cls(BertConfig.from_dir(folder))
        try:
            encoder.load_state_dict(_our_names(load_file(folder / "model.safetensors"), folder), assign=True)
        except (OSError, RuntimeError) as exc:  # unreadable, or missing / misshapen tensors
            raise ModelFileError(f"cannot load {folder / 'model.safetensors'}: {exc}") from exc
        return encoder.eval().requires_grad_(False)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """Hidden states, HF's `hidden_states` convention: [0] is the embeddings' output, [i] the output of layer i,
        up to `num_layers` (default all). ids [batch, tokens] (int64), mask [batch, tokens] (True/1 = real token,
        0 = padding); each state is [batch, tokens, hidden] float32. Token types are all 0 (single sentences)."""
        num_layers = self.config.num_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= self.config.num_layers:
            raise InvalidRequestError(f"num_layers must be in 0..{self.config.num_layers}; got {num_layers}")
        if ids.shape[1] > self.config.max_positions:
            raise InvalidRequestError(f"{ids.shape[1]} tokens is over the encoder's {self.config.max_positions} "
                                      "positions; truncate the input")
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.word(ids) + self.token_type(torch.zeros_like(ids)) + self.position(positions)
        states = [self.embed_norm(h)]
        key_mask = mask.bool()[:, None, None, :]
        for layer in self.layers[:num_layers]:
            states.append(layer(states[-1], key_mask))
        return states


def _our_names(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """HF BertModel's state dict (with or without the `bert.` prefix) renamed to ours."""
    ours = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("bert.")
        if name.startswith(_UNUSED):
            continue
        module, _, param = name.rpartition(".")
        if module in _EMBEDDING_NAMES:
            ours[f"{_EMBEDDING_NAMES[module]}.{param}"] = tensor
            continue
        parts = module.split(".", 3)  # encoder, layer, i, rest
        if len(parts) != 4 or parts[:2] != ["encoder", "layer"] or parts[3] not in _LAYER_NAMES:
            raise ModelFileError(f"{folder / 'model.safetensors'}: unexpected tensor {name!r}; is this a BERT model?")
        ours[f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{param}"] = tensor
    return {name: tensor.float() for name, tensor in ours.items()}  # the forward runs in fp32 (a no-op on fp32 files)
