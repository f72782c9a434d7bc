"""The model's architecture, read once from GGUF metadata into a frozen, validated dataclass.

Owns: which architectures llmaas runs (llama family, dense, full RoPE) and the refusal of everything else with a
message that says so. Ignores: weights (weights.py) and tokenizer (tokenizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmaas.errors import UnsupportedModelError
from llmaas.model.gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_theta: float
    rope_linear_factor: float  # positions are divided by this (GGUF rope.scaling.type == "linear"); 1.0 = none
    tied_embeddings: bool

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                     "context_length"):
            if getattr(self, name) <= 0:
                raise UnsupportedModelError(f"model metadata has {name}={getattr(self, name)}; it must be positive")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} KV heads"
            )
        if self.head_dim % 32:
            raise UnsupportedModelError(f"head_dim {self.head_dim} is not a multiple of 32, which llmaas requires")
        if self.rope_linear_factor <= 0:
            raise UnsupportedModelError(f"RoPE scaling factor {self.rope_linear_factor} must be positive")

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        arch = f.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{f.path.name} is a {arch!r} model; llmaas runs llama-architecture GGUFs "
                "(e.g. SmolLM2, TinyLlama, Llama 3). Pick a llama-family model."
            )
        if f.get(f"{arch}.expert_count", 0):
            raise UnsupportedModelError(f"{f.path.name} is a mixture-of-experts model; llmaas runs dense models only")
        n_heads = int(f.get(f"{arch}.attention.head_count"))
        d_model = int(f.get(f"{arch}.embedding_length"))
        head_dim = int(f.get(f"{arch}.attention.key_length", d_model // n_heads))
        if int(f.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
            raise UnsupportedModelError("keys and values of different widths are not supported")
        rope_dim = int(f.get(f"{arch}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise UnsupportedModelError(f"partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
        scaling = f.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported (only none and linear)")
        factor = float(f.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        tokens = f.get("tokenizer.ggml.tokens", None)
        vocab_size = int(f.get(f"{arch}.vocab_size", len(tokens) if tokens else 0))
        return cls(
            name=str(f.get("general.name", f.path.stem)),
            n_layers=int(f.get(f"{arch}.block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(f.get(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(f.get(f"{arch}.feed_forward_length")),
            vocab_size=vocab_size,
            context_length=int(f.get(f"{arch}.context_length", 2048)),
            norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_linear_factor=factor,
            tied_embeddings="output.weight" not in f.tensors,
        )
