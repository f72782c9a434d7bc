"""GGUF tensors as llmaas weights: a dense fp32 copy for GEMM, and for 4/8-bit types an exact block copy.

Owns: dequantisation (the `gguf` package's, for every type it knows) and the re-layout of Q4_0, Q4_1, Q4_K and Q8_0
blocks into the two formats the small-batch kernels read (`Q4Blocks`, `Q8Blocks`) without changing a single weight.
Ignores: how weights are multiplied (linear.py) and which tensors form the model (loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from llmaas.errors import UnsupportedModelError
from llmaas.model.gguf_file import TensorInfo

BLOCK = 32
# Every type the gguf package can dequantise, minus the ones whose layout it only guesses.
DENSE_TYPES = frozenset({
    QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q2_K,
    QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
})


@dataclass(frozen=True, eq=False)
class Q4Blocks:
    """4-bit weights in 32-value blocks: w = scale * q + min, q in 0..15. Holds Q4_0, Q4_1 and Q4_K exactly."""

    qs: torch.Tensor  # uint8 [rows, cols // 2]; block byte j = element j (low nibble) | element j + 16 (high)
    scales: torch.Tensor  # float16 (Q4_0, Q4_1) or float32 (Q4_K: products of two stored scales) [rows, cols // 32]
    mins: torch.Tensor  # same dtype and shape as scales

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.scales.nbytes + self.mins.nbytes

    def dequantize(self) -> torch.Tensor:
        """fp32 [rows, cols], bit-identical to gguf's dequantisation (every product here is exact in fp32)."""
        qs = self.qs.view(self.qs.shape[0], -1, BLOCK // 2)
        w = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # in place from here: one fp32 copy at the peak
        return w.mul_(self.scales.float()[..., None]).add_(self.mins.float()[..., None]).flatten(1)


@dataclass(frozen=True, eq=False)
class Q8Blocks:
    """8-bit weights in 32-value blocks: w = scale * q, q int8. Holds Q8_0 exactly."""

    qs: torch.Tensor  # int8 [rows, cols]
    scales: torch.Tensor  # float16 [rows, cols // 32]

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.scales.nbytes

    def dequantize(self) -> torch.Tensor:
        """fp32 [rows, cols], bit-identical to gguf's dequantisation."""
        w = self.qs.view(self.qs.shape[0], -1, BLOCK).float()
        return w.mul_(self.scales.float()[..., None]).flatten(1)


Blocks = Q4Blocks | Q8Blocks


def read_dense(t: TensorInfo, raw: np.ndarray, blocks: Blocks | None = None) -> torch.Tensor:
    """The tensor as fp32 from its bytes (GGUFFile.read), rows = GGUF's slowest dimension ([out, in] for a weight
    matrix). When its blocks are already read, they are expanded instead (same values, about 5x faster than gguf's
    numpy path)."""
    if blocks is not None:
        return blocks.dequantize()
    if t.tensor_type not in DENSE_TYPES:
        raise UnsupportedModelError(
            f"tensor {t.name} has type {t.tensor_type.name}, which llmaas does not read; supported: "
            + ", ".join(sorted(q.name for q in DENSE_TYPES))
        )
    shape = tuple(reversed(t.shape))
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, t.tensor_type)).reshape(shape))


def read_blocks(t: TensorInfo, raw: np.ndarray) -> Blocks | None:
    """The tensor in a kernel block format if its GGUF type maps onto one exactly, else None."""
    if len(t.shape) != 2 or int(t.shape[0]) % BLOCK:
        return None
    rows = int(t.shape[1])
    raw = raw.reshape(rows, -1)
    if t.tensor_type == QType.Q4_0:  # [d f16][16 B]: w = d * (q - 8)
        blk = raw.reshape(rows, -1, 18)
        scales = _f16(blk[..., 0:2])
        return Q4Blocks(_u8(blk[..., 2:]), scales, scales * -8)
    if t.tensor_type == QType.Q4_1:  # [d f16][m f16][16 B]: w = d * q + m
        blk = raw.reshape(rows, -1, 20)
        return Q4Blocks(_u8(blk[..., 4:]), _f16(blk[..., 0:2]), _f16(blk[..., 2:4]))
    if t.tensor_type == QType.Q8_0:  # [d f16][32 x int8]: w = d * q
        blk = raw.reshape(rows, -1, 34)
        return Q8Blocks(torch.from_numpy(blk[..., 2:].copy().view(np.int8).reshape(rows, -1)), _f16(blk[..., 0:2]))
    if t.tensor_type == QType.Q4_K:
        return _q4k_blocks(raw, rows)
    return None


def _q4k_blocks(raw: np.ndarray, rows: int) -> Q4Blocks:
    """Q4_K super-blocks of 256 = 8 sub-blocks of 32 with 6-bit scales/mins: w = d*sc*q - dmin*m per sub-block."""
    sup = raw.reshape(-1, 144)
    d = sup[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = sup[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = gguf.quants.Q4_K.get_scale_min(sup[:, 4:16].copy())
    scales = (d * sc.astype(np.float32)).reshape(rows, -1)
    mins = (-dmin * mn.astype(np.float32)).reshape(rows, -1)
    # Each 32-byte chunk holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles, element i at byte i;
    # our blocks put element j at byte j's low nibble and element j + 16 at its high nibble.
    chunks = sup[:, 16:].reshape(-1, 4, 1, 32)
    values = (chunks >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # [n, 4, 2, 32]
    values = values.reshape(-1, 8, 32)
    packed = values[..., :16] | (values[..., 16:] << 4)
    return Q4Blocks(torch.from_numpy(packed.reshape(rows, -1).astype(np.uint8)), torch.from_numpy(scales),
                    torch.from_numpy(mins))


def concat_blocks(parts: list[Blocks | None]) -> Blocks | None:
    """Row-wise concatenation of blocks of one format (fused q/k/v or gate/up), or None if the formats differ."""
    first = parts[0]
    if first is None or any(type(p) is not type(first) for p in parts):
        return None
    if len(parts) == 1:
        return first
    if isinstance(first, Q8Blocks):
        return Q8Blocks(torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts]))
    if any(p.scales.dtype != first.scales.dtype for p in parts):
        return None
    return Q4Blocks(torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts]),
                    torch.cat([p.mins for p in parts]))


def _f16(two_bytes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].copy())


def _u8(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).reshape(b.shape[0], -1))


def quantize_q8(dense: torch.Tensor) -> Q8Blocks:
    """Q8_0 blocks of an fp32 [rows, cols] matrix (cols a multiple of 32): scale = max|w| / 127 per block, stored
    fp16, q rounded to nearest. For weights that no longer line up with their original blocks (reordered columns)."""
    rows, cols = dense.shape
    if cols % BLOCK:
        raise UnsupportedModelError(f"cannot block {cols} columns into blocks of {BLOCK}")
    blocks = dense.reshape(rows, cols // BLOCK, BLOCK)
    scales = (blocks.abs().amax(dim=-1) / 127).half()
    inv = torch.where(scales.float() > 0, 1 / scales.float(), torch.zeros(()))
    qs = torch.round(blocks * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return Q8Blocks(qs.reshape(rows, cols).contiguous(), scales.contiguous())
