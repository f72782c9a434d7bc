"""Rotary position embedding tables and their application at explicit, arbitrary positions.

Owns: the cos/sin tables (built once in float64, stored fp32) for GGUF llama models, whose q/k rows are laid out
for interleaved pairs (2i, 2i+1), the llama.cpp "normal" RoPE. Ignores: which positions a token has (callers pass
them), so a chunk recomputed out of order gets exactly the rotation it had originally.
"""

from __future__ import annotations

import torch

from llmaas.errors import ContextLengthError


class RopeTable:
    def __init__(self, head_dim: int, theta: float, max_positions: int, linear_factor: float = 1.0,
                 freq_factors: torch.Tensor | None = None) -> None:
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if freq_factors is not None:  # Llama 3 style per-frequency divisors (GGUF tensor rope_freqs.weight)
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] / linear_factor * inv_freq[None, :]
        self.max_positions = max_positions
        self.cos = angles.cos().float().contiguous()  # [P, head_dim / 2]
        self.sin = angles.sin().float().contiguous()
        self._cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [P, head_dim / 2]

    def check(self, positions: torch.Tensor) -> None:
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.max_positions):
            raise ContextLengthError(
                f"positions {int(positions.min())}..{int(positions.max())} fall outside the model's "
                f"{self.max_positions}-position window; shorten the context"
            )

    def apply_(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Rotate x [M, H, D] in place; x's last dimension must be contiguous."""
        m, h, d = x.shape
        pairs = torch.view_as_complex(x.view(m, h, d // 2, 2))
        pairs.mul_(self._cis[positions][:, None, :])

    def rotated(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [..., T, D] rotated out of place at positions [T] (differentiable: the training forward's RoPE)."""
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())
        return torch.view_as_real(pairs * self._cis.to(x.device)[positions]).flatten(-2)
