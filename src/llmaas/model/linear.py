"""One weight matrix W [out, in], applied as y = x @ W[rows, cols]^T on any row and column range, without copying W.

Owns: the choice between the dense fp32 GEMM (any batch; the exact reference) and the block kernels (batches of at
most SMALL_BATCH_ROWS rows, weights read in their 4/8-bit GGUF form). Ranges are what elastic sub-models need:
a prefix of rows (output units) or a block-aligned range of columns (input units) is a zero-copy view of either copy.
Ignores: which ranges are active (the transformer decides per layer).
"""

from __future__ import annotations

from types import ModuleType

import torch

from llmaas.model.weights import BLOCK, Blocks, Q4Blocks

# Up to this many activation rows the block kernels beat the fp32 GEMM on 2 AVX2 cores (bench: q4 30 layers,
# M=8 20 ms vs fp32 ~35 ms); beyond it GEMM wins and stays exact.
SMALL_BATCH_ROWS = 8

Range = tuple[int, int]


def flat(ranges: list[Range]) -> list[int]:
    """[(a, b), (c, d)] -> [a, b, c, d]: how the kernels take range lists."""
    return [i for r in ranges for i in r]


class Linear:
    """A weight matrix with a dense fp32 copy and, when the GGUF type allows it exactly, a block copy."""

    def __init__(self, dense: torch.Tensor, blocks: Blocks | None, kernels: ModuleType | None) -> None:
        assert dense.dim() == 2 and dense.dtype == torch.float32
        self.dense = dense.contiguous()
        self.blocks = blocks if kernels is not None else None
        self._kernels = kernels

    @property
    def out_features(self) -> int:
        return self.dense.shape[0]

    @property
    def in_features(self) -> int:
        return self.dense.shape[1]

    @property
    def nbytes(self) -> int:
        return self.dense.nbytes + (self.blocks.nbytes if self.blocks is not None else 0)

    def apply(self, x: torch.Tensor, out: torch.Tensor, rows: Range | None = None, cols: Range | None = None,
              accumulate: bool = False) -> torch.Tensor:
        """out[M, r1-r0] (+)= x[M, c1-c0] @ W[r0:r1, c0:c1]^T; `out` may be a column slice of a larger buffer."""
        r0, r1 = rows if rows is not None else (0, self.out_features)
        c0, c1 = cols if cols is not None else (0, self.in_features)
        if self.blocks is not None and x.shape[0] <= SMALL_BATCH_ROWS and c0 % BLOCK == 0:
            b = self.blocks
            if isinstance(b, Q4Blocks):
                self._kernels.q4_matmul(out, x, b.qs, b.scales, b.mins, r0, r1, c0, c1, accumulate)
            else:
                self._kernels.q8_matmul(out, x, b.qs, b.scales, r0, r1, c0, c1, accumulate)
            return out
        # A [rows, cols] slice of the row-major dense copy has strides (in, 1): BLAS takes it as is, no copy.
        w_t = self.dense[r0:r1, c0:c1].t()
        if accumulate:
            return out.addmm_(x, w_t)
        return torch.mm(x, w_t, out=out)

    def apply_ranges(self, x: torch.Tensor, out: torch.Tensor, rows: list[Range], cols: list[Range],
                     accumulate: bool = False) -> torch.Tensor:
        """out[:, r] (+)= sum over the column ranges of x[:, c] @ W[r, c]^T for r in the row ranges; x [M, in] and
        out [M, out] are full-width buffers indexed by absolute column and row (columns outside the ranges are never
        read, rows outside them never written). Ranges sorted and disjoint. One kernel call for all of them: a
        sub-model's active units are several ranges, and a call per range cost more than it saved at decode."""
        if (self.blocks is not None and x.shape[0] <= SMALL_BATCH_ROWS
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
