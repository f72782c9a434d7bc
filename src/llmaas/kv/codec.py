"""KV chunk codecs: the byte layout of a chunk at each level (INT8 base, INT4/INT2 requantized, FP16 for baselines),
encode / requantize / decode as pure torch functions, and decode_into, which writes chunks straight into the
engine's fp16 per-layer KV tensors (native kernel, torch fallback).

Owns bytes and numerics only. Ignores which level a chunk should have (memory.levels), where payloads live
(storage) and headers or checksums around them (storage.chunk_log).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import ModuleType
from typing import NamedTuple

import torch

from llmaas.errors import KernelBuildError
from llmaas.kv.spec import KVSpec

DEFAULT_CHUNK_TOKENS = 16


class KVLevel(IntEnum):
    """Bits per stored value. FP16 is the baselines' lossless codec; the others are LLMS's tolerance levels."""

    INT2 = 2
    INT4 = 4
    INT8 = 8
    FP16 = 16


# e(w): relative reconstruction error of each level against the INT8 base (e(INT8) = 0), defined as
#   e = ( sum|K8 - Kw|^2 / sum|K8|^2  +  sum|V8 - Vw|^2 / sum|V8|^2 ) / 2
# with sums pooled over every element of every chunk and layer, K8/V8 the INT8-dequantized values and Kw/Vw the
# level-w values requantized from them. Measured on SmolLM2-135M-Instruct KV of alpaca calibration text (not the
# wikitext-2 text used for perplexity). Measure again with (docs/KV_CODEC.md):
#   llmaas eval kv --level-error
LEVEL_ERROR: dict[KVLevel, float] = {
    KVLevel.INT8: 0.0,
    KVLevel.INT4: 5.11e-3,  # K 8.9e-4, V 9.3e-3
    KVLevel.INT2: 1.28e-1,  # K 2.3e-2, V 2.3e-1
}


class SectionLayout(NamedTuple):
    """Byte offsets inside one layer's section: K codes | K scales (+ zeros) | V codes | V scales (+ zeros)."""

    k_codes: int
    k_meta: int
    v_codes: int
    v_meta: int
    total_bytes: int


@dataclass(frozen=True)
class ChunkGeometry:
    """A chunk: chunk_tokens tokens x all layers x K and V x all KV heads; payloads are layer-major, so any layer
    range of a chunk is one contiguous byte range."""

    spec: KVSpec
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1; got {self.chunk_tokens}")
        if self.spec.head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 to pack INT2 values; got {self.spec.head_dim}")

    @property
    def values_per_tensor(self) -> int:
        """Values of K (or of V) in one layer of one chunk."""
        return self.spec.n_kv_heads * self.chunk_tokens * self.spec.head_dim

    def layout(self, level: KVLevel) -> SectionLayout:
        return _layout(self, KVLevel(level))

    def section_bytes(self, level: KVLevel) -> int:
        """Bytes of ONE layer of one chunk: codes, scales and zero-points of K and V."""
        return self.layout(level).total_bytes

    def payload_bytes(self, level: KVLevel) -> int:
        """Bytes of a whole chunk (all layers)."""
        return self.spec.n_layers * self.section_bytes(level)


# Cached: a restore asks for sizes per chunk, hundreds of times per context (~0.5 ms of recomputing them).
@functools.cache
def _layout(geometry: ChunkGeometry, level: KVLevel) -> SectionLayout:
    h, c, d = geometry.spec.n_kv_heads, geometry.chunk_tokens, geometry.spec.head_dim
    codes = geometry.values_per_tensor * int(level) // 8
    if level == KVLevel.FP16:
        return SectionLayout(0, codes, codes, 2 * codes, 2 * codes)
    fields = 1 if level == KVLevel.INT8 else 2  # fp16 scale, plus an fp16 zero-point below INT8
    k_meta, v_meta = 2 * fields * h * d, 2 * fields * h * c  # K per channel, V per token and head
    return SectionLayout(0, codes, codes + k_meta, 2 * codes + k_meta, 2 * codes + k_meta + v_meta)


# -- fp16 scale rounding: scales round up and zero-points down, so the fp16 grid still covers every value ---------

def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return _finite(torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h))


def _fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return _finite(torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h))


def _finite(h: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(h).all():
        raise ValueError("a scale or zero-point overflows fp16: KV values must be finite and within fp16 range")
    return h


def _safe_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0)


def _fill_mask(n: int, geom: ChunkGeometry, fills: Sequence[int] | None) -> torch.Tensor | None:
    """bool [n, 1, 1, C, 1]: True for filled token slots; None when every chunk is full."""
    if fills is None:
        return None
    if len(fills) != n or any(not 1 <= f <= geom.chunk_tokens for f in fills):
        raise ValueError(f"need one fill in 1..{geom.chunk_tokens} per chunk ({n}); got {list(fills)}")
    return (torch.arange(geom.chunk_tokens) < torch.tensor(fills)[:, None]).view(n, 1, 1, -1, 1)


# -- byte packing: INT4 byte j holds values j (low) and j + D/2; INT2 byte j holds j + i*D/4 at bits 2i ------------

def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (each < 2**bits) -> packed uint8 [..., D * bits / 8] ("parallel bit shifts")."""
    per = 8 // bits
    parts = codes.to(torch.uint8).unflatten(-1, (per, codes.shape[-1] // per))
    out = parts[..., 0, :].clone()
    for i in range(1, per):
        out |= parts[..., i, :] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.cat(parts, dim=-1)


def _as_bytes(t: torch.Tensor, n: int, layers: int) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(n, layers, -1)


def _fp16_field(payload: torch.Tensor, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    n_bytes = 2 * torch.Size(shape).numel()
    raw = payload[..., start:start + n_bytes].contiguous()
    return raw.view(torch.float16).reshape(*payload.shape[:2], *shape).float()


# -- encode ---------------------------------------------------------------------------------------------------------

def _int8_sym(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 along `dim` (reduced): int8 codes and fp16 scales with |x - q*s| <= s/2."""
    scale = _fp16_at_least(x.abs().amax(dim=dim) / 127.0)
    q = torch.round(_safe_div(x, scale.float().unsqueeze(dim))).clamp_(-127, 127)
    return q.to(torch.int8), scale


def _asym(x: torch.Tensor, dim: int, bits: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Asymmetric linear quantization along `dim`, min/max over masked-in values only: x ~= q * scale + zero."""
    lo = x if mask is None else torch.where(mask, x, float("inf"))
    hi = x if mask is None else torch.where(mask, x, float("-inf"))
    zero = _fp16_at_most(lo.amin(dim=dim))
    scale = _fp16_at_least((hi.amax(dim=dim) - zero.float()) / ((1 << bits) - 1))
    q = torch.round(_safe_div(x - zero.float().unsqueeze(dim), scale.float().unsqueeze(dim)))
    q = q.clamp_(0, (1 << bits) - 1).to(torch.uint8)
    if mask is not None:
        q = torch.where(mask, q, 0)
    return q, scale, zero


def encode(k: torch.Tensor, v: torch.Tensor, level: KVLevel, geom: ChunkGeometry,
           fills: Sequence[int] | None = None) -> torch.Tensor:
    """k, v float [n, L, Hkv, C, D] (C == chunk_tokens; partial chunks zero-padded, fills[i] tokens filled) ->
    uint8 [n, L, section_bytes(level)]. Token slots past a chunk's fill never influence its scales."""
    n, layers = k.shape[:2]
    expected = (layers, geom.spec.n_kv_heads, geom.chunk_tokens, geom.spec.head_dim)
    if k.shape != v.shape or tuple(k.shape[1:]) != expected:
        raise ValueError(f"k and v must be [n, L, Hkv, C, D] with [L, Hkv, C, D] = {list(expected)}; "
                         f"got {list(k.shape)} and {list(v.shape)}")
    mask = _fill_mask(n, geom, fills)
    k, v = k.float(), v.float()
    if mask is not None:
        k, v = torch.where(mask, k, 0.0), torch.where(mask, v, 0.0)
    if level == KVLevel.FP16:
        return torch.cat([_as_bytes(k.half(), n, layers), _as_bytes(v.half(), n, layers)], dim=-1)
    if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
        raise ValueError("KV holds inf or NaN values; they cannot be quantized")
    kq, ks = _int8_sym(k, dim=-2)  # K: one scale per (head, channel), over the chunk's tokens
    vq, vs = _int8_sym(v, dim=-1)  # V: one scale per (head, token)
    payload = torch.cat([_as_bytes(t, n, layers) for t in (kq, ks, vq, vs)], dim=-1)
    return payload if level == KVLevel.INT8 else requantize(payload, level, geom, fills)


def requantize(payload_int8: torch.Tensor, level: KVLevel, geom: ChunkGeometry,
               fills: Sequence[int] | None = None) -> torch.Tensor:
    """INT8 payloads [n, L, S8] -> level (INT8, INT4 or INT2) payloads, asymmetric on the INT8 axes, from the
    INT8-dequantized values (fills as in encode: padding never influences scales or zero-points)."""
    if level == KVLevel.INT8:
        return payload_int8
    if level not in (KVLevel.INT4, KVLevel.INT2):
        raise ValueError(f"requantize goes from INT8 down to INT4 or INT2, not to {level!r}")
    n, layers = payload_int8.shape[:2]
    k, v = decode(payload_int8, KVLevel.INT8, geom)
    mask = _fill_mask(n, geom, fills)
    kq, ks, kz = _asym(k, -2, int(level), mask)
    vq, vs, vz = _asym(v, -1, int(level), None)  # per token: padded tokens decode to 0 and keep scale 0
    fields = (pack(kq, int(level)), ks, kz, pack(vq, int(level)), vs, vz)
    return torch.cat([_as_bytes(t, n, layers) for t in fields], dim=-1)


# -- decode ---------------------------------------------------------------------------------------------------------

def decode(payload: torch.Tensor, level: KVLevel, geom: ChunkGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, L, S] -> (k, v) float32 [n, L, Hkv, C, D]: the reference decode (decode_into must equal it
    after rounding to fp16)."""
    lay = geom.layout(level)
    if payload.dtype != torch.uint8 or payload.dim() != 3 or payload.shape[-1] != lay.total_bytes:
        raise ValueError(f"a {level.name} payload is uint8 [n, L, {lay.total_bytes}]; got {payload.dtype} "
                         f"{list(payload.shape)}")
    h, c, d = geom.spec.n_kv_heads, geom.chunk_tokens, geom.spec.head_dim
    if level == KVLevel.FP16:
        return _fp16_field(payload, lay.k_codes, (h, c, d)), _fp16_field(payload, lay.v_codes, (h, c, d))
    n, layers = payload.shape[:2]
    bits = int(level)

    def codes(start: int) -> torch.Tensor:
        raw = payload[..., start:start + geom.values_per_tensor * bits // 8].reshape(n, layers, h, c, -1)
        return raw.view(torch.int8).float() if bits == 8 else unpack(raw, bits).float()

    k, v = codes(lay.k_codes), codes(lay.v_codes)
    ks = _fp16_field(payload, lay.k_meta, (h, 1, d))
    vs = _fp16_field(payload, lay.v_meta, (h, c, 1))
    if bits == 8:
        return k * ks, v * vs
    # q * scale is exact in fp32 (<= 8-bit code times an 11-bit mantissa), so the only rounding is the add: the
    # native kernel gets the same bits whether or not its compiler fuses the two into an FMA.
    kz = _fp16_field(payload, lay.k_meta + 2 * h * d, (h, 1, d))
    vz = _fp16_field(payload, lay.v_meta + 2 * h * c, (h, c, 1))
    return k * ks + kz, v * vs + vz


def decode_into(payloads: Sequence[torch.Tensor], levels: Sequence[KVLevel], token_starts: Sequence[int],
                fills: Sequence[int], first_layer: int, num_layers: int, out: Sequence[torch.Tensor],
                geometry: ChunkGeometry, *, use_kernels: bool = True, whole: bool = False) -> None:
    """Decode chunk i's layers [first_layer, first_layer + num_layers) (payloads[i]: their sections, contiguous
    uint8, of chunks of `geometry`; with `whole`, every layer's sections, from layer 0) into
    out[first_layer + j][:, :, token_starts[i] : token_starts[i] + fills[i]] ([2, Hkv, cap, D], as geometry's spec
    says). `whole` spares a restore decoding batches of layers one slice per chunk per batch.

    Uses the native kernel for fp16 outputs when it builds; otherwise (or with use_kernels=False) the torch
    reference, which gives the same bits. Bad sizes or ranges raise ValueError before anything is written."""
    n = len(payloads)
    if not len(levels) == len(token_starts) == len(fills) == n:
        raise ValueError("payloads, levels, token_starts and fills need one entry per chunk")
    if n == 0 or num_layers == 0:
        return
    if first_layer < 0 or num_layers < 0 or first_layer + num_layers > len(out):
        raise ValueError(f"layers [{first_layer}, {first_layer + num_layers}) are outside the {len(out)} outputs")
    layers_out = list(out[first_layer:first_layer + num_layers])
    sample = layers_out[0]
    spec, chunk_tokens = geometry.spec, geometry.chunk_tokens
    if (len(out), sample.shape[1], sample.shape[3]) != (spec.n_layers, spec.n_kv_heads, spec.head_dim):
        raise ValueError(f"outputs of {len(out)} layers x {sample.shape[1]} KV heads x {sample.shape[3]} dims do not "
                         f"match the geometry's {spec.n_layers} x {spec.n_kv_heads} x {spec.head_dim}")
    kernels = _native() if use_kernels else None
    if kernels is not None and _native_ok(layers_out):
        # The kernel checks every size and range itself before it writes (per-layer restores call this 30 times
        # per context, so Python-side checks would cost more than the decode of a layer).
        try:
            kernels.decode_kv_chunks(payloads, levels, token_starts, fills, layers_out, chunk_tokens,
                                     first_layer if whole else 0, spec.n_layers if whole else num_layers)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from exc
        return
    if whole:
        payloads = [p.reshape(-1)[first_layer * geometry.section_bytes(KVLevel(lv)):
                      (first_layer + num_layers) * geometry.section_bytes(KVLevel(lv))]
                    for p, lv in zip(payloads, levels, strict=True)]
    for p, lv, start, fill in zip(payloads, levels, token_starts, fills, strict=True):
        want = num_layers * geometry.section_bytes(KVLevel(lv))
        if p.dtype != torch.uint8 or p.numel() != want:
            raise ValueError(f"a {KVLevel(lv).name} payload of {num_layers} layers is {want} uint8 bytes; got "
                             f"{p.numel()} {p.dtype}")
        if not (1 <= fill <= chunk_tokens and start >= 0 and start + fill <= sample.shape[2]):
            raise ValueError(f"token range [{start}, {start + fill}) is outside a chunk of {chunk_tokens} or "
                             f"the cache of {sample.shape[2]} slots")
    _decode_into_torch(payloads, levels, token_starts, fills, layers_out, geometry)


def _decode_into_torch(payloads: Sequence[torch.Tensor], levels: Sequence[KVLevel], token_starts: Sequence[int],
                       fills: Sequence[int], out: list[torch.Tensor], geom: ChunkGeometry) -> None:
    by_level: dict[KVLevel, list[int]] = {}
    for i, lv in enumerate(levels):
        by_level.setdefault(KVLevel(lv), []).append(i)
    for lv, idx in by_level.items():  # one batched decode per level
        batch = torch.stack([payloads[i].reshape(len(out), -1) for i in idx])
        k, v = decode(batch, lv, geom)  # [n, L, Hkv, C, D]
        for b, i in enumerate(idx):
            start, fill = token_starts[i], fills[i]
            for j, dst in enumerate(out):
                dst[0, :, start:start + fill] = k[b, j, :, :fill]
                dst[1, :, start:start + fill] = v[b, j, :, :fill]


def _native_ok(out: list[torch.Tensor]) -> bool:
    """The kernel's contract: fp16 [2, Hkv, cap, D] outputs of one shape, contiguous D, D a multiple of 32."""
    first = out[0]
    return all(t.dtype == torch.float16 and t.dim() == 4 and t.shape == first.shape and t.stride(3) == 1
               for t in out) and first.shape[0] == 2 and first.shape[3] % 32 == 0


@functools.cache
def _native() -> ModuleType | None:
    """The kernel module if it builds and has the decode (tried once per process: a failed build is not retried
    on every restore)."""
    from llmaas.kernels import load_kernels

    try:
        kernels = load_kernels()
    except KernelBuildError:
        return None
    return kernels if hasattr(kernels, "decode_kv_chunks") else None
