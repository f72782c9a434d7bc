"""KV chunk codecs: sizes against the spec's table, bit-exact packing, error bounds implied by the stored scales,
partial-chunk padding, FP16 losslessness, and decode_into (native kernel and torch fallback) against decode."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llmaas.kernels import cpu_features
from llmaas.kv.codec import (
    LEVEL_ERROR,
    ChunkGeometry,
    KVLevel,
    decode,
    decode_into,
    encode,
    pack,
    requantize,
    unpack,
)
from llmaas.kv.spec import KVSpec

DEFAULT = ChunkGeometry(KVSpec(30, 3, 64))  # SmolLM2-135M
SMALL = ChunkGeometry(KVSpec(4, 2, 64))
LOW = (KVLevel.INT4, KVLevel.INT2)


def random_kv(geom: ChunkGeometry, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a few outlier channels (as rotated keys have), values with a few outlier tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, geom.spec.n_layers, geom.spec.n_kv_heads, geom.chunk_tokens, geom.spec.head_dim)
    k = torch.randn(shape, generator=g) * (1 + 20 * (torch.rand(shape[-1], generator=g) > 0.9))
    v = torch.randn(shape, generator=g) * (1 + 5 * (torch.rand(shape[-2], 1, generator=g) > 0.8)) + 0.3
    return k.half().float(), v.half().float()  # the engine's KV is fp16


def fp16_field(payload: torch.Tensor, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    raw = payload[..., start:start + 2 * torch.Size(shape).numel()].contiguous()
    return raw.view(torch.float16).float().reshape(*payload.shape[:2], *shape)


def scales(payload: torch.Tensor, level: KVLevel, geom: ChunkGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored K scales [n, L, H, 1, D] and V scales [n, L, H, C, 1], for broadcasting against values."""
    lay, h, c, d = geom.layout(level), geom.spec.n_kv_heads, geom.chunk_tokens, geom.spec.head_dim
    return fp16_field(payload, lay.k_meta, (h, 1, d)), fp16_field(payload, lay.v_meta, (h, c, 1))


@pytest.mark.parametrize("level,payload,meta", [(KVLevel.FP16, 12288, 0), (KVLevel.INT8, 6144, 480),
                                                (KVLevel.INT4, 3072, 960), (KVLevel.INT2, 1536, 960)])
def test_sizes_match_the_spec_table(level, payload, meta):
    assert DEFAULT.section_bytes(level) == payload + meta
    assert DEFAULT.payload_bytes(level) == 30 * (payload + meta)
    lay = DEFAULT.layout(level)
    assert lay.v_codes - lay.k_meta + lay.total_bytes - lay.v_meta == meta
    k, v = random_kv(DEFAULT, 1)
    assert encode(k, v, level, DEFAULT).shape == (1, 30, payload + meta)


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_is_bit_exact(bits):
    codes = torch.randint(0, 1 << bits, (5, 7, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 7, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(8, 32)  # unpack is a bijection on bytes
    assert torch.equal(pack(unpack(every_byte, bits), bits), every_byte)


def test_int4_packing_puts_value_j_and_j_plus_half_in_byte_j():
    codes = torch.zeros(64, dtype=torch.uint8)
    codes[3], codes[35] = 0x5, 0xA
    assert pack(codes, 4)[3].item() == 0xA5


def test_int8_error_is_within_half_a_scale():
    k, v = random_kv(SMALL, 3)
    payload = encode(k, v, KVLevel.INT8, SMALL)
    kd, vd = decode(payload, KVLevel.INT8, SMALL)
    ks, vs = scales(payload, KVLevel.INT8, SMALL)
    # |x - q*s| <= s/2 exactly; x/s is rounded once in fp32 before rounding to an integer (relative 2^-24)
    assert torch.all((k - kd).abs() <= ks / 2 * (1 + 1e-5))
    assert torch.all((v - vd).abs() <= vs / 2 * (1 + 1e-5))
    assert torch.all(ks * 127 >= k.abs().amax(dim=-2, keepdim=True))  # fp16 scales round up: no clipping


@pytest.mark.parametrize("level", LOW)
def test_low_levels_error_is_within_half_a_scale_of_the_int8_values(level):
    k, v = random_kv(SMALL, 3, seed=1)
    p8 = encode(k, v, KVLevel.INT8, SMALL)
    k8, v8 = decode(p8, KVLevel.INT8, SMALL)
    payload = requantize(p8, level, SMALL)
    assert torch.equal(payload, encode(k, v, level, SMALL))
    kd, vd = decode(payload, level, SMALL)
    ks, vs = scales(payload, level, SMALL)
    # plus one fp32 rounding of q*s + zero
    assert torch.all((k8 - kd).abs() <= ks / 2 * (1 + 1e-5) + 1e-6 * k8.abs())
    assert torch.all((v8 - vd).abs() <= vs / 2 * (1 + 1e-5) + 1e-6 * v8.abs())


@pytest.mark.parametrize("level", [KVLevel.INT8, *LOW])
def test_padding_does_not_change_the_filled_tokens(level):
    """A chunk of 5 tokens padded to 16 decodes its 5 tokens exactly as a 5-token chunk does, whatever the
    padding holds."""
    k, v = random_kv(SMALL, 1, seed=2)
    fill = 5
    five = ChunkGeometry(SMALL.spec, chunk_tokens=fill)
    k5, v5 = decode(encode(k[..., :fill, :], v[..., :fill, :], level, five), level, five)
    zero_padded = [torch.cat([x[..., :fill, :], torch.zeros_like(x[..., fill:, :])], dim=-2) for x in (k, v)]
    payload = encode(*zero_padded, level, SMALL, fills=[fill])
    assert torch.equal(payload, encode(k, v, level, SMALL, fills=[fill]))  # garbage padding: same bytes
    kd, vd = decode(payload, level, SMALL)
    assert torch.equal(kd[..., :fill, :], k5)
    assert torch.equal(vd[..., :fill, :], v5)
    if level != KVLevel.INT8:  # without fills, zero padding widens the per-channel range of K
        kd_nofill, _ = decode(encode(*zero_padded, level, SMALL), level, SMALL)
        assert not torch.equal(kd_nofill[..., :fill, :], k5)


def test_fp16_is_lossless():
    k, v = random_kv(SMALL, 2, seed=3)
    kd, vd = decode(encode(k, v, KVLevel.FP16, SMALL), KVLevel.FP16, SMALL)
    assert torch.equal(kd, k) and torch.equal(vd, v)


def test_errors_grow_as_levels_drop():
    k, v = random_kv(SMALL, 2, seed=4)
    k8, _ = decode(encode(k, v, KVLevel.INT8, SMALL), KVLevel.INT8, SMALL)
    errs = [((decode(encode(k, v, lv, SMALL), lv, SMALL)[0] - k8) ** 2).mean() for lv in LOW]
    assert 0 < errs[0] < errs[1]
    assert LEVEL_ERROR[KVLevel.INT8] == 0 < LEVEL_ERROR[KVLevel.INT4] < LEVEL_ERROR[KVLevel.INT2]


def test_bad_inputs_are_refused():
    k, v = random_kv(SMALL, 1)
    with pytest.raises(ValueError, match="Hkv"):
        encode(k[..., :8, :], v[..., :8, :], KVLevel.INT8, SMALL)
    with pytest.raises(ValueError, match="fill"):
        encode(k, v, KVLevel.INT8, SMALL, fills=[0])
    with pytest.raises(ValueError, match="INT4 or INT2"):
        requantize(encode(k, v, KVLevel.INT8, SMALL), KVLevel.FP16, SMALL)
    with pytest.raises(ValueError, match="uint8"):
        decode(encode(k, v, KVLevel.INT8, SMALL), KVLevel.INT4, SMALL)


# -- decode_into ----------------------------------------------------------------------------------------------------

def _chunks(geom: ChunkGeometry, n: int) -> tuple[list[torch.Tensor], list[KVLevel], list[int], list[int]]:
    """n chunks of mixed levels; the last one is partial."""
    k, v = random_kv(geom, n, seed=5)
    levels = [(KVLevel.INT8, KVLevel.INT4, KVLevel.INT2, KVLevel.FP16)[i % 4] for i in range(n)]
    fills = [geom.chunk_tokens] * (n - 1) + [7]
    payloads = [encode(k[i:i + 1], v[i:i + 1], lv, geom, fills=[f])[0]
                for i, (lv, f) in enumerate(zip(levels, fills, strict=True))]
    return payloads, levels, [geom.chunk_tokens * i + 3 for i in range(n)], fills


def _expected(payloads, levels, starts, fills, geom, first, num, cap) -> list[torch.Tensor]:
    out = [torch.full((2, geom.spec.n_kv_heads, cap, geom.spec.head_dim), -7.0, dtype=torch.float16)
           for _ in range(geom.spec.n_layers)]
    for p, lv, s, f in zip(payloads, levels, starts, fills, strict=True):
        k, v = decode(p[None], lv, geom)
        for j in range(first, first + num):
            out[j][0, :, s:s + f] = k[0, j, :, :f].half()
            out[j][1, :, s:s + f] = v[0, j, :, :f].half()
    return out


@contextlib.contextmanager
def isa(kernels, name: str):
    """The native decode forced onto one instruction set (the test skipped where the CPU lacks it), then restored
    to the CPU's choice."""
    try:
        kernels.set_kv_decode_isa(name)
    except RuntimeError as exc:
        pytest.skip(f"KV decode path {name}: {exc}")
    try:
        yield kernels
    finally:
        kernels.set_kv_decode_isa("auto")


def test_the_kv_decode_path_follows_the_cpu(kernels):
    features = cpu_features()
    wide = all(features[f] for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    assert kernels.kv_decode_isa() == ("avx512" if wide else "avx2")
    with pytest.raises(RuntimeError, match="auto, avx2 or avx512"):
        kernels.set_kv_decode_isa("sse2")
    assert kernels.kv_decode_isa() == ("avx512" if wide else "avx2")


@pytest.mark.parametrize("first,num", [(0, 4), (1, 2)])
@pytest.mark.parametrize("native", [None, "avx2", "avx512"])
@pytest.mark.parametrize("whole", [False, True])
def test_decode_into_equals_decode(first, num, native, whole, request):
    """Bit-exact: every path computes q*s (exact in fp32) + zero in fp32, then rounds once to fp16. `whole`: the
    payloads hold every layer and the decode skips to the first asked for (a restore's batches). `native`: the
    kernel on that instruction set (None: the torch fallback)."""
    with contextlib.ExitStack() as stack:
        kernels = stack.enter_context(isa(request.getfixturevalue("kernels"), native)) if native else None
        _check_decode_into(first, num, kernels, whole)


def _check_decode_into(first, num, kernels, whole):
    n, cap = 9, 9 * 16 + 8
    payloads, levels, starts, fills = _chunks(SMALL, n)
    expected = _expected(payloads, levels, starts, fills, SMALL, first, num, cap)
    out = [torch.full((2, 2, cap, 64), -7.0, dtype=torch.float16) for _ in range(SMALL.spec.n_layers)]
    ranges = payloads if whole else [p.reshape(SMALL.spec.n_layers, -1)[first:first + num].reshape(-1)
                                     for p in payloads]
    if kernels is not None:
        kernels.decode_kv_chunks(ranges, [int(lv) for lv in levels], starts, fills, out[first:first + num], 16,
                                 first if whole else 0, SMALL.spec.n_layers if whole else num)
    else:
        decode_into(ranges, levels, starts, fills, first, num, out, SMALL, use_kernels=False, whole=whole)
    for got, want in zip(out, expected, strict=True):
        assert torch.equal(got, want)


def test_decode_into_writes_fp32_caches_with_the_fallback():
    payloads, levels, starts, fills = _chunks(SMALL, 4)
    out = [torch.zeros(2, 2, 80, 64) for _ in range(SMALL.spec.n_layers)]
    decode_into(payloads, levels, starts, fills, 0, SMALL.spec.n_layers, out, SMALL)
    k, v = decode(payloads[1][None], levels[1], SMALL)
    assert torch.equal(out[2][0, :, starts[1]:starts[1] + 16], k[0, 2])
    assert torch.equal(out[2][1, :, starts[1]:starts[1] + 16], v[0, 2])


@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_into_refuses_bad_ranges_and_sizes_before_writing(use_kernels):
    payloads, levels, starts, fills = _chunks(SMALL, 2)
    out = [torch.zeros(2, 2, 20, 64, dtype=torch.float16) for _ in range(SMALL.spec.n_layers)]
    with pytest.raises(ValueError, match="outside"):
        decode_into(payloads, levels, starts, fills, 0, SMALL.spec.n_layers, out, SMALL, use_kernels=use_kernels)
    with pytest.raises(ValueError, match="uint8"):
        decode_into([p[:-1] for p in payloads], levels, [0, 1], fills, 0, SMALL.spec.n_layers, out, SMALL,
                    use_kernels=use_kernels)
    assert all(not t.any() for t in out)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_into_decodes_other_chunk_sizes(use_kernels):
    geom = ChunkGeometry(SMALL.spec, chunk_tokens=8)
    layers = SMALL.spec.n_layers
    payloads, levels, starts, fills = _chunks(geom, 4)
    out = [torch.full((2, 2, 40, 64), -7.0, dtype=torch.float16) for _ in range(layers)]
    decode_into(payloads, levels, starts, fills, 0, layers, out, geom, use_kernels=use_kernels)
    for got, want in zip(out, _expected(payloads, levels, starts, fills, geom, 0, layers, 40), strict=True):
        assert torch.equal(got, want)


def test_values_beyond_fp16_range_are_refused():
    k, v = random_kv(SMALL, 1)
    k[0, 0, 0, 0, 0] = 1e9
    with pytest.raises(ValueError, match="fp16"):
        encode(k, v, KVLevel.INT8, SMALL)


def test_cut_chunks_takes_any_spans_and_joins_back():
    from llmaas.kv.chunking import contiguous_spans, cut_chunks, join_chunks

    kv = [torch.randn(2, 3, 40, 8) for _ in range(2)]  # two layers, 40 token slots
    k, v = cut_chunks(kv, [(32, 5), (0, 16)], 16)  # out of order, one short
    assert torch.equal(k[0, 1, :, :5], kv[1][0, :, 32:37]) and torch.equal(v[1, 0], kv[0][1, :, 0:16])
    assert not k[0, :, :, 5:].any()  # the short chunk is zero-padded
    assert contiguous_spans(37, 16) == [(0, 16), (16, 16), (32, 5)]
    whole = join_chunks(*cut_chunks(kv, contiguous_spans(37, 16), 16), 37)
    assert torch.equal(whole, torch.stack([t[:, :, :37] for t in kv], dim=1))
    with pytest.raises(ValueError):
        cut_chunks(kv, [(0, 17)], 16)


@pytest.mark.parametrize("native", ["avx2", "avx512"])
@pytest.mark.parametrize("head_dim", [64, 32])
def test_large_decodes_stream_and_narrow_heads_fall_back_bit_exactly(native, head_dim, kernels):
    """Outputs of 8 MB or more take the streaming stores; a head_dim that is not a multiple of 64 takes the AVX2
    kernel even where AVX-512 is asked for. Every level, bit-exact against the torch reference."""
    geom = ChunkGeometry(KVSpec(2, 2, head_dim))
    n = 8 * 2**20 // (2 * 2 * 2 * head_dim * 2 * geom.chunk_tokens) + 4  # chunks for > 8 MB of fp16 output
    payloads, levels, starts, fills = _chunks(geom, n)
    cap = starts[-1] + geom.chunk_tokens
    with isa(kernels, native):
        out = [torch.full((2, 2, cap, head_dim), -7.0, dtype=torch.float16) for _ in range(2)]
        decode_into(payloads, levels, starts, fills, 0, 2, out, geom)
    for got, want in zip(out, _expected(payloads, levels, starts, fills, geom, 0, 2, cap), strict=True):
        assert torch.equal(got, want)
