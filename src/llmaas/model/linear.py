"""One weight matrix W [out, in], held once, applied as y = x @ W[rows, cols]^T on any row and column range.

Owns: how a matrix is stored and multiplied. A matrix whose GGUF type maps exactly onto a block format is held only as
those 4/8-bit blocks: batches of at most SMALL_BATCH_ROWS rows (decode) go to the block kernels, larger ones (prefill)
expand W, tile by tile, into one reused fp32 buffer per thread and run the fp32 GEMM on it. The expansion is
bit-identical to the fp32 copy the model used to keep, so the GEMM path computes exactly what it did; it costs about
0.2 ms per layer (16 G values/s on 2 Zen 4 cores), 3% of a 128-token prefill. Other types (F32, F16, K-quants without
a block format) are held dense. Ranges are what elastic sub-models need: a prefix of rows (output units) or a
block-aligned range of columns (input units), read without copying the stored weights.
Ignores: which ranges are active (the transformer decides per layer).
"""

from __future__ import annotations

import threading
from types import ModuleType

import torch

from llmaas.model.weights import BLOCK, Blocks, Q4Blocks, Q8Blocks, quantize_q8

# Up to this many activation rows the block kernels beat the fp32 GEMM on 2 AVX2 cores (bench: q4 30 layers,
# M=8 20 ms vs fp32 ~35 ms); beyond it GEMM wins and stays exact.
SMALL_BATCH_ROWS = 8
# The expansion buffer: every layer matrix of a 135M-1B model fits in one tile (gate+up of SmolLM2-135M is 1.8 M
# values); the LM head (28 M values) goes in tiles. 8 MiB a thread, instead of the 540 MB a dense copy took.
TILE_VALUES = 2 * 1024 * 1024

Range = tuple[int, int]

_scratch = threading.local()
_NO_IDS = torch.empty(0, dtype=torch.int64)
_NO_MINS = torch.empty(0, dtype=torch.float16)
# The large-batch (prefill) paths for block-stored weights: FP32 expands the blocks exactly and runs BLAS's fp32 GEMM;
# BF16 (CPUs with AVX-512 BF16) rounds activations and weights to bf16 and sums products in fp32 in the native kernel,
# about 2x faster on Zen 4 (kernels.cpp: gemm_bf16). Decode (small batches) is the same on both.
FP32, BF16 = "fp32", "bf16"
GEMM_PATHS = (FP32, BF16)


def flat(ranges: list[Range]) -> list[int]:
    """[(a, b), (c, d)] -> [a, b, c, d]: how the kernels take range lists."""
    return [i for r in ranges for i in r]


def joined(ranges: list[Range]) -> list[Range]:
    """Sorted ranges with each one that starts where the previous ends joined to it, empty ones dropped: a sub-model's
    full KV groups give touching head ranges, and one long range is one GEMM (one activation conversion) or one
    stream of weight rows instead of several."""
    out: list[Range] = []
    for a, b in ranges:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _tile_buffer(values: int) -> torch.Tensor:
    """This thread's expansion buffer, at least `values` long (threads never share one: the engine's compute thread
    and an offline job may both run a model)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < values:
        buf = torch.empty(max(values, TILE_VALUES))
        _scratch.buf = buf
    return buf


class Linear:
    """A weight matrix stored once: as blocks (`blocks`, read by the kernels or expanded for the GEMM) when its GGUF
    type allows it exactly and the kernels are there, else dense fp32 (`dense`)."""

    def __init__(self, stored: torch.Tensor | Blocks, kernels: ModuleType | None, gemm: str = FP32) -> None:
        """`gemm` is the large-batch path for block-stored weights (GEMM_PATHS; the loader picks it per CPU)."""
        if gemm not in GEMM_PATHS:
            raise ValueError(f"gemm must be one of {GEMM_PATHS}; got {gemm!r}")
        if isinstance(stored, torch.Tensor):
            assert stored.dim() == 2 and stored.dtype == torch.float32
            self.dense: torch.Tensor | None = stored.contiguous()
            self.blocks: Blocks | None = None
        else:
            self.dense, self.blocks = None, stored
        self._kernels = kernels
        self.gemm = gemm if kernels is not None else FP32
        # Set by gather_columns_: the exact blocks in their stored column order, and W's columns as indices into them.
        self._source: Blocks | None = None
        self._cols: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.dense.shape[0] if self.dense is not None else self.blocks.scales.shape[0]  # type: ignore[union-attr]

    @property
    def in_features(self) -> int:
        if self.dense is not None:
            return self.dense.shape[1]
        return self.blocks.scales.shape[1] * BLOCK  # type: ignore[union-attr]

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return self.dense.nbytes
        extra = self._source.nbytes + self._cols.nbytes if self._source is not None and self._cols is not None else 0
        return self.blocks.nbytes + extra  # type: ignore[union-attr]

    def gather_rows_(self, rows: torch.Tensor) -> None:
        """W := W[rows] in place (a permutation of output units: storage pointers unchanged, blocks stay exact)."""
        for b in (self.blocks, self._source):
            if b is not None:
                for t in (b.qs, b.scales) + ((b.mins,) if isinstance(b, Q4Blocks) else ()):
                    t.copy_(t[rows])
        if self.dense is not None:
            self.dense.copy_(self.dense[rows])

    def gather_columns_(self, cols: torch.Tensor) -> None:
        """W := W[:, cols] (a permutation of input units). Dense, or blocks moved whole: in place and exact.
        An order that splits 32-column blocks (reordered FFN neurons): the small-batch kernels need one scale per 32
        columns, so they get Q8_0 blocks re-quantised from the exact values (decode then differs from the original by
        Q8 rounding); the GEMM path keeps expanding the exact blocks through the column order, so a full-width prefill
        still computes the original model's values."""
        if self.dense is not None:
            self.dense.copy_(self.dense[:, cols])
            return
        b = self.blocks
        assert b is not None
        n = cols.numel() // BLOCK
        starts = cols.view(n, BLOCK)[:, 0] if cols.numel() % BLOCK == 0 else None
        if self._cols is None and starts is not None and bool((starts % BLOCK == 0).all()) and torch.equal(
                cols.view(n, BLOCK), starts[:, None] + torch.arange(BLOCK)):
            order = starts // BLOCK
            per_block = b.qs.shape[1] // b.scales.shape[1]  # bytes (Q4: 16) or values (Q8: 32) of qs per block
            b.qs.copy_(b.qs[:, (order[:, None] * per_block + torch.arange(per_block)).flatten()])
            for t in (b.scales,) + ((b.mins,) if isinstance(b, Q4Blocks) else ()):
                t.copy_(t[:, order])
            return
        exact = self.dequantized()[:, cols]
        if self._cols is None:
            self._source, self._cols = b, cols.clone()
        else:
            self._cols = self._cols[cols]
        self.blocks = quantize_q8(exact)

    def dequantized(self, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        """A new fp32 copy of W[r0:r1, c0:c1] (the whole matrix by default): for offline work that needs the values
        as a tensor (training, tests). The serving paths never call it."""
        r0, r1 = rows if rows is not None else (0, self.out_features)
        c0, c1 = cols if cols is not None else (0, self.in_features)
        if self.dense is not None:
            return self.dense[r0:r1, c0:c1].clone()
        b0, b1 = self._expansion_bounds(c0, c1)
        out = torch.empty(r1 - r0, b1 - b0)
        self._expand(out, r0, r1, b0, b1)
        return out[:, c0 - b0:c1 - b0].contiguous() if (b0, b1) != (c0, c1) else out

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows W[ids] as a new fp32 [len(ids), in] tensor: the embedding lookup of a (tied) table."""
        if self.dense is not None:
            return self.dense[ids]
        b = self.blocks
        assert b is not None and self._cols is None
        if isinstance(b, Q4Blocks):
            return Q4Blocks(b.qs[ids], b.scales[ids], b.mins[ids]).dequantize()
        return Q8Blocks(b.qs[ids], b.scales[ids]).dequantize()

    def apply(self, x: torch.Tensor, out: torch.Tensor, rows: Range | None = None, cols: Range | None = None,
              accumulate: bool = False) -> torch.Tensor:
        """out[M, r1-r0] (+)= x[M, c1-c0] @ W[r0:r1, c0:c1]^T; `out` may be a column slice of a larger buffer."""
        r0, r1 = rows if rows is not None else (0, self.out_features)
        c0, c1 = cols if cols is not None else (0, self.in_features)
        b = self.blocks
        if b is not None and self._kernels is not None and x.shape[0] <= SMALL_BATCH_ROWS and c0 % BLOCK == 0:
            if isinstance(b, Q4Blocks):
                self._kernels.q4_matmul(out, x, b.qs, b.scales, b.mins, r0, r1, c0, c1, accumulate)
            else:
                self._kernels.q8_matmul(out, x, b.qs, b.scales, r0, r1, c0, c1, accumulate)
            return out
        if self.dense is not None:
            # A [rows, cols] slice of the row-major dense copy has strides (in, 1): BLAS takes it as is, no copy.
            return _mm(x, self.dense[r0:r1, c0:c1].t(), out, accumulate)
        if self.gemm == BF16:
            src, ids = (self._source, self._cols[c0:c1]) if self._cols is not None else (self.blocks, _NO_IDS)
            assert src is not None and self._kernels is not None
            mins = src.mins if isinstance(src, Q4Blocks) else _NO_MINS
            self._kernels.blocks_gemm_bf16(out, x, src.qs, src.scales, mins, r0, r1, c0, c1, ids, accumulate)
            return out
        b0, b1 = self._expansion_bounds(c0, c1)
        width = b1 - b0
        step = max(1, TILE_VALUES // width)
        buf = _tile_buffer(min(r1 - r0, step) * width)
        for t0 in range(r0, r1, step):
            t1 = min(r1, t0 + step)
            tile = buf[:(t1 - t0) * width].view(t1 - t0, width)
            self._expand(tile, t0, t1, b0, b1)
            _mm(x, tile[:, c0 - b0:c1 - b0].t(), out[:, t0 - r0:t1 - r0], accumulate)
        return out

    def _expansion_bounds(self, c0: int, c1: int) -> Range:
        """The columns to expand for W[:, c0:c1]: whole blocks (a range ending inside one, such as a sub-model's
        width, then uses a view of the expansion), or exactly c0:c1 through a column order."""
        if self._cols is not None:
            return c0, c1
        return c0 // BLOCK * BLOCK, -(-c1 // BLOCK) * BLOCK

    def _expand(self, out: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> None:
        """out [r1-r0, c1-c0] = W[r0:r1, c0:c1] from the exact blocks, bit-identical to their dequantize()."""
        b, ids = (self._source, self._cols[c0:c1]) if self._cols is not None else (self.blocks, _NO_IDS)
        assert b is not None
        if self._kernels is None:
            full = (Q4Blocks(b.qs[r0:r1], b.scales[r0:r1], b.mins[r0:r1]) if isinstance(b, Q4Blocks)
                    else Q8Blocks(b.qs[r0:r1], b.scales[r0:r1])).dequantize()
            out.copy_(full[:, ids] if ids.numel() else full[:, c0:c1])
        elif isinstance(b, Q4Blocks):
            self._kernels.q4_expand(out, b.qs, b.scales, b.mins, r0, r1, c0, c1, ids)
        else:
            self._kernels.q8_expand(out, b.qs, b.scales, r0, r1, c0, c1, ids)

    def apply_ranges(self, x: torch.Tensor, out: torch.Tensor, rows: list[Range], cols: list[Range],
                     accumulate: bool = False) -> torch.Tensor:
        """out[:, r] (+)= sum over the column ranges of x[:, c] @ W[r, c]^T for r in the row ranges; x [M, in] and
        out [M, out] are full-width buffers indexed by absolute column and row (columns outside the ranges are never
        read, rows outside them never written). Ranges sorted and disjoint. One kernel call for all of them: a
        sub-model's active units are several ranges, and a call per range cost more than it saved at decode."""
        rows, cols = joined(rows), joined(cols)
        if (self.blocks is not None and self._kernels is not None and x.shape[0] <= SMALL_BATCH_ROWS
                and all(c0 % BLOCK == 0 for c0, _ in cols)):
            flat_rows, flat_cols = flat(rows), flat(cols)
            b = self.blocks
            if isinstance(b, Q4Blocks):
                self._kernels.q4_matmul_ranges(out, x, b.qs, b.scales, b.mins, flat_rows, flat_cols, accumulate)
            else:
                self._kernels.q8_matmul_ranges(out, x, b.qs, b.scales, flat_rows, flat_cols, accumulate)
            return out
        for r0, r1 in rows:
            for j, (c0, c1) in enumerate(cols):
                self.apply(x[:, c0:c1], out[:, r0:r1], rows=(r0, r1), cols=(c0, c1), accumulate=accumulate or j > 0)
        return out


def _mm(x: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    if accumulate:
        return out.addmm_(x, w_t)
    return torch.mm(x, w_t, out=out)
