"""Cutting dense per-layer KV into chunks and joining chunks back: the one place that does it.

Owns the layout change between a dense cache (per layer [2, Hkv, tokens, D], the model's KV view) and the codec's
chunks (K and V [N, L, Hkv, C, D], a short last chunk zero-padded). The store seals chunks from its working KV, the
restore profiler encodes a whole context, and the KV evaluation cuts segments the same way. Ignores what a chunk is
encoded to (codec.py) and where it is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Span = tuple[int, int]  # (first token, tokens filled): one chunk's place in the dense KV


def contiguous_spans(num_tokens: int, chunk_tokens: int) -> list[Span]:
    """The spans of the chunks that cover tokens [0, num_tokens), the last one short if it must be."""
    return [(start, min(chunk_tokens, num_tokens - start)) for start in range(0, num_tokens, chunk_tokens)]


def cut_chunks(kv: Sequence[torch.Tensor], spans: Sequence[Span],
               chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer [2, Hkv, >= end, D] -> (k, v) float32 [N, L, Hkv, C, D] of the chunks at `spans`, zero-padded."""
    _, n_kv_heads, _, head_dim = kv[0].shape
    k = torch.zeros(len(spans), len(kv), n_kv_heads, chunk_tokens, head_dim)
    v = torch.zeros_like(k)
    for i, (start, fill) in enumerate(spans):
        if not 1 <= fill <= chunk_tokens:
            raise ValueError(f"a chunk holds 1..{chunk_tokens} tokens; got {fill}")
        for layer, t in enumerate(kv):
            k[i, layer, :, :fill] = t[0, :, start:start + fill]
            v[i, layer, :, :fill] = t[1, :, start:start + fill]
    return k, v


def join_chunks(k: torch.Tensor, v: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(k, v) [N, L, Hkv, C, D] of contiguous chunks -> [2, L, Hkv, num_tokens, D] (the inverse of cutting
    contiguous_spans(num_tokens, C))."""
    x = torch.stack([k, v]).permute(0, 2, 3, 1, 4, 5)  # [2, L, Hkv, N, C, D]
    return x.flatten(3, 4)[:, :, :, :num_tokens]
