"""Load a GGUF into a ready Transformer and Tokenizer: the one entry point the CLI, engine and tests use.

Owns: which GGUF tensors form which weights (q/k/v and gate/up fused row-wise; tied LM head), whether the native
kernels are used, and the load-time report. Ignores: the forward math (transformer.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from llmaas.errors import InvalidRequestError, KernelBuildError, ModelFileError
from llmaas.kernels import load_kernels
from llmaas.model.chat_template import ChatTemplate
from llmaas.model.config import ModelConfig
from llmaas.model.gguf_file import GGUFFile
from llmaas.model.linear import BF16, FP32, GEMM_PATHS, Linear
from llmaas.model.tokenizer import Tokenizer
from llmaas.model.transformer import LayerWeights, ModelWeights, Transformer
from llmaas.model.weights import concat_blocks, read_blocks, read_dense
from llmaas.paths import default_model_path

AUTO = "auto"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    path: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None  # None: the GGUF has none (a base model); use raw prompts
    tensor_types: dict[str, int]  # GGUF tensor type name -> number of tensors
    load_s: float
    gemm: str  # the prefill (large-batch) matmul path for block-stored weights: linear.FP32 or linear.BF16

    @functools.cached_property
    def model_id(self) -> str:
        """Name plus a fingerprint of the config and the weights file (size and a sample of its bytes: cheap, and
        any re-quantization or other checkpoint changes it), so KV built by another model is never reused."""
        h = hashlib.blake2b(repr(self.config).encode(), digest_size=8)
        size = self.path.stat().st_size
        h.update(str(size).encode())
        with open(self.path, "rb") as f:
            for offset in range(0, size, max(1, size // 64)):  # 64 samples of 4 KiB spread over the file
                f.seek(offset)
                h.update(f.read(4096))
        return f"{self.path.stem}:{h.hexdigest()}"


def load_model(path: str | Path | None = None, *, use_kernels: bool = True, gemm: str = AUTO) -> LoadedModel:
    """Load `path` (default: the bundled SmolLM2-135M-Instruct). `use_kernels=False` forces the dense PyTorch path;
    `gemm` picks the prefill matmul path (AUTO: the fastest this CPU has, see choose_gemm). Compute threads are the
    process's (engine.cpu_governor.apply_threads)."""
    t0 = time.perf_counter()
    f = GGUFFile(path if path is not None else default_model_path())
    config = ModelConfig.from_gguf(f)
    tokenizer = Tokenizer.from_gguf(f)
    special = tokenizer.special
    chat_template = ChatTemplate.from_gguf(
        f, tokenizer.token_text(special.bos_id) if special.bos_id is not None else "",
        tokenizer.token_text(special.eos_id) if special.eos_id is not None else "")
    kernels = _kernels() if use_kernels else None
    gemm_path = choose_gemm(gemm, kernels)
    weights = _read_weights(f, config, kernels, gemm_path)
    types = dict(Counter(t.tensor_type.name for t in f.tensors.values()))
    loaded = LoadedModel(f.path, config, Transformer(config, weights, kernels), tokenizer, chat_template, types,
                         time.perf_counter() - t0, gemm_path)
    del f  # its metadata (the whole vocabulary as Python objects) is no longer needed
    _return_free_heap()
    return loaded


def _return_free_heap() -> None:
    """Hand the heap that loading freed (tensor bytes read, re-laid out and dropped) back to the OS: glibc keeps it
    otherwise, 10 MB of resident memory on SmolLM2 (measured). Elsewhere than glibc, nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def choose_gemm(wanted: str, kernels: ModuleType | None) -> str:
    """The prefill matmul path: AUTO takes BF16 where the CPU has AVX-512 BF16 (about 2x the fp32 GEMM on Zen 4,
    measured in docs/ENGINE.md) and FP32 elsewhere; FP32 and BF16 force one (BF16 is refused where the CPU lacks it).
    Without the native kernels there is only FP32."""
    if wanted not in (AUTO, *GEMM_PATHS):
        raise InvalidRequestError(f"gemm must be one of {(AUTO, *GEMM_PATHS)}; got {wanted!r}")
    has_bf16 = kernels is not None and bool(kernels.has_bf16())
    if wanted == BF16 and not has_bf16:
        raise InvalidRequestError("the bf16 GEMM path needs the native kernels and a CPU with AVX-512 BF16; this "
                                  "one has " + ("no native kernels" if kernels is None else "no AVX-512 BF16")
                                  + ": use --gemm fp32 or auto")
    if wanted == AUTO:
        return BF16 if has_bf16 else FP32
    return wanted


def _kernels() -> ModuleType | None:
    try:
        return load_kernels()
    except KernelBuildError as exc:
        print(f"llmaas: {exc}; decoding falls back to dense PyTorch (slower)", file=sys.stderr)
        return None


def _linear(f: GGUFFile, names: list[str], out_features: int, in_features: int,
            kernels: ModuleType | None, gemm: str) -> Linear:
    """The named matrices stacked row-wise into one Linear, checked against the shape the metadata implies. Held as
    blocks when every part has a block format and the kernels are there (the one resident copy), else dense fp32."""
    tensors = [f.tensor(n) for n in names]
    raws = [f.read(t) for t in tensors]
    parts = [read_blocks(t, raw) for t, raw in zip(tensors, raws, strict=True)]
    blocks = concat_blocks(parts) if kernels is not None else None
    lin = Linear(blocks if blocks is not None else torch.cat([read_dense(t, raw, b) for t, raw, b in zip(
        tensors, raws, parts, strict=True)]), kernels, gemm)
    _expect_shape(f, "+".join(names), (lin.out_features, lin.in_features), (out_features, in_features))
    return lin


def _vector(f: GGUFFile, name: str, size: int) -> torch.Tensor:
    t = f.tensor(name)
    v = read_dense(t, f.read(t))
    _expect_shape(f, name, tuple(v.shape), (size,))
    return v


def _expect_shape(f: GGUFFile, name: str, got: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if got != shape:
        raise ModelFileError(
            f"{f.path.name}: {name} has shape {got} but the metadata implies {shape}; the file is "
            "inconsistent or not a standard llama GGUF"
        )


def _read_weights(f: GGUFFile, c: ModelConfig, kernels: ModuleType | None, gemm: str) -> ModelWeights:
    layers = []
    for i in range(c.n_layers):
        b = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=_vector(f, b + "attn_norm.weight", c.d_model),
            qkv=_linear(f, [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
                        c.q_dim + 2 * c.kv_dim, c.d_model, kernels, gemm),
            o=_linear(f, [b + "attn_output.weight"], c.d_model, c.q_dim, kernels, gemm),
            ffn_norm=_vector(f, b + "ffn_norm.weight", c.d_model),
            gate_up=_linear(f, [b + "ffn_gate.weight", b + "ffn_up.weight"], 2 * c.ffn_dim, c.d_model, kernels, gemm),
            down=_linear(f, [b + "ffn_down.weight"], c.d_model, c.ffn_dim, kernels, gemm),
        ))
    if c.tied_embeddings:
        lm_head = embedding = _linear(f, ["token_embd.weight"], c.vocab_size, c.d_model, kernels, gemm)
    else:
        lm_head = _linear(f, ["output.weight"], c.vocab_size, c.d_model, kernels, gemm)
        embedding = _linear(f, ["token_embd.weight"], c.vocab_size, c.d_model, kernels, gemm)
    freq_factors = _vector(f, "rope_freqs.weight", c.head_dim // 2) if "rope_freqs.weight" in f.tensors else None
    return ModelWeights(embedding, tuple(layers), _vector(f, "output_norm.weight", c.d_model), lm_head, freq_factors)
