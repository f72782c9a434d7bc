"""Write tiny llama-architecture GGUFs for tests: 2 layers, d_model 256 (the smallest width K-quants allow), GQA 4/2,
a byte-level vocabulary with three control tokens, weights of any GGUF type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

D_MODEL, FFN, N_HEADS, N_KV_HEADS, N_LAYERS = 256, 512, 4, 2, 2
HEAD_DIM = D_MODEL // N_HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# A SentencePiece-style vocabulary: <unk>, BOS, EOS, the 256 byte-fallback tokens, then pieces with scores (a merge
# whose result scores higher happens first).
SPM_PIECES = {"▁": -1.0, "h": -2.0, "e": -3.0, "l": -4.0, "o": -5.0, "w": -6.0, "r": -7.0, "d": -8.0, "ll": -20.0,
              "▁h": -21.0, "▁he": -22.0, "llo": -23.0, "▁hello": -24.0, "▁w": -25.0, "or": -26.0, "▁wor": -27.0,
              "ld": -28.0, "▁world": -29.0}


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    scores = [0.0] * 259 + list(SPM_PIECES.values())
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)  # unknown, control, byte, normal
    return tokens, scores, types


def _random_blocks(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant bytes (gguf-py cannot quantize to K-quants): small fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = (rng.random((rows, cols // block, 2)) * 0.01 + 0.001).astype(np.float16).view(np.uint8)
    if qtype == QType.Q4_K:
        raw[..., 0:4] = scales.reshape(rows, cols // block, 4)
    elif qtype == QType.Q6_K:
        raw[..., size - 2:size] = scales[..., :2]
        raw[..., 192:208] = rng.integers(-20, 20, size=(rows, cols // block, 16)).astype(np.int8).view(np.uint8)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, -1)


def _add_matrix(w: gguf.GGUFWriter, name: str, rows: int, cols: int, qtype: QType, rng: np.random.Generator) -> None:
    values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if qtype == QType.F32:
        w.add_tensor(name, values)
    elif qtype == QType.F16:
        w.add_tensor(name, values.astype(np.float16))
    elif qtype in (QType.Q4_K, QType.Q6_K):
        w.add_tensor(name, _random_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
    else:
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


def write_tiny_llama(path: Path, qtype: QType = QType.F32, *, arch: str = "llama", embed_qtype: QType | None = None,
                     seed: int = 0, extra_metadata: dict | None = None, sentencepiece: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    tokens = spm_vocab()[0] if sentencepiece else byte_tokens() + CONTROL
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    if sentencepiece:
        _, scores, types = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * 256 + [3] * len(CONTROL))
        w.add_bos_token_id(256 + 1)
        w.add_eos_token_id(256 + 2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_metadata or {}).items():
        w.add_key_value(key, value, gguf.GGUFValueType.UINT32)
    vocab = len(tokens)
    _add_matrix(w, "token_embd.weight", vocab, D_MODEL, embed_qtype or qtype, rng)
    w.add_tensor("output_norm.weight", np.ones(D_MODEL, dtype=np.float32))
    for i in range(N_LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32))
        w.add_tensor(b + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32))
        _add_matrix(w, b + "attn_q.weight", N_HEADS * HEAD_DIM, D_MODEL, qtype, rng)
        _add_matrix(w, b + "attn_k.weight", N_KV_HEADS * HEAD_DIM, D_MODEL, qtype, rng)
        _add_matrix(w, b + "attn_v.weight", N_KV_HEADS * HEAD_DIM, D_MODEL, qtype, rng)
        _add_matrix(w, b + "attn_output.weight", D_MODEL, N_HEADS * HEAD_DIM, qtype, rng)
        _add_matrix(w, b + "ffn_gate.weight", FFN, D_MODEL, qtype, rng)
        _add_matrix(w, b + "ffn_up.weight", FFN, D_MODEL, qtype, rng)
        _add_matrix(w, b + "ffn_down.weight", D_MODEL, FFN, qtype, rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
