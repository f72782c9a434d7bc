"""Load a GGUF into a ready Transformer and Tokenizer: the one entry point the CLI, engine and tests use.

Owns: which GGUF tensors form which weights (q/k/v and gate/up fused row-wise; tied LM head), whether the native
kernels are used, and the load-time report. Ignores: the forward math (transformer.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from llmaas.errors import KernelBuildError
from llmaas.kernels import load_kernels
from llmaas.model.chat_template import ChatTemplate
from llmaas.model.config import ModelConfig
from llmaas.model.gguf_file import GGUFFile
from llmaas.model.linear import Linear
from llmaas.model.locate import default_model_path
from llmaas.model.tokenizer import Tokenizer
from llmaas.model.transformer import LayerWeights, ModelWeights, Transformer
from llmaas.model.weights import concat_blocks, read_blocks, read_dense


@dataclass(frozen=True, eq=False)
class LoadedModel:
    path: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None  # None: the GGUF has none (a base model); use raw prompts
    tensor_types: dict[str, int]  # GGUF tensor type name -> number of tensors
    load_s: float


def load_model(path: str | Path | None = None, *, use_kernels: bool = True) -> LoadedModel:
    """Load `path` (default: the bundled SmolLM2-135M-Instruct). `use_kernels=False` forces the dense PyTorch path."""
    t0 = time.perf_counter()
    f = GGUFFile(path if path is not None else default_model_path())
    config = ModelConfig.from_gguf(f)
    tokenizer = Tokenizer.from_gguf(f)
    special = tokenizer.special
    chat_template = ChatTemplate.from_gguf(
        f, tokenizer.token_text(special.bos_id) if special.bos_id is not None else "",
        tokenizer.token_text(special.eos_id) if special.eos_id is not None else "")
    kernels = _kernels() if use_kernels else None
    weights = _read_weights(f, config, kernels)
    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return LoadedModel(f.path, config, Transformer(config, weights, kernels), tokenizer, chat_template, types,
                       time.perf_counter() - t0)


def _kernels() -> ModuleType | None:
    try:
        return load_kernels()
    except KernelBuildError as exc:
        print(f"llmaas: {exc}; decoding falls back to dense PyTorch (slower)", file=sys.stderr)
        return None


def _linear(f: GGUFFile, names: list[str], kernels: ModuleType | None) -> Linear:
    tensors = [f.tensor(n) for n in names]
    parts = [read_blocks(t) for t in tensors]
    dense = torch.cat([read_dense(t, b) for t, b in zip(tensors, parts, strict=True)])
    return Linear(dense, concat_blocks(parts) if kernels is not None else None, kernels)


def _read_weights(f: GGUFFile, config: ModelConfig, kernels: ModuleType | None) -> ModelWeights:
    layers = []
    for i in range(config.n_layers):
        b = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=read_dense(f.tensor(b + "attn_norm.weight")),
            qkv=_linear(f, [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"], kernels),
            o=_linear(f, [b + "attn_output.weight"], kernels),
            ffn_norm=read_dense(f.tensor(b + "ffn_norm.weight")),
            gate_up=_linear(f, [b + "ffn_gate.weight", b + "ffn_up.weight"], kernels),
            down=_linear(f, [b + "ffn_down.weight"], kernels),
        ))
    embed = f.tensor("token_embd.weight")
    embed_blocks = read_blocks(embed)
    embedding = read_dense(embed, embed_blocks)
    if config.tied_embeddings:
        lm_head = Linear(embedding, embed_blocks if kernels is not None else None, kernels)
    else:
        lm_head = _linear(f, ["output.weight"], kernels)
    freq_factors = read_dense(f.tensor("rope_freqs.weight")) if "rope_freqs.weight" in f.tensors else None
    return ModelWeights(embedding, tuple(layers), read_dense(f.tensor("output_norm.weight")), lm_head, freq_factors)
