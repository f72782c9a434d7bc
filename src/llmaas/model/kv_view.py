"""The KV-view protocol: how the model reads and writes a sequence's keys and values without owning them.

The caller (a dense cache for plain generation, the chunked memory manager for service contexts) builds a view for
one forward pass, knowing where the new tokens go. The model asks it for the positions of all visible keys once, and
per layer hands it the new tokens' keys and values (one tensor) and gets back the layer's full keys and values.
Masking is by absolute position (a query sees keys at positions <= its own), so keys may sit in any slot order and
may include tokens after the query (recompute of non-contiguous chunks). A view may instead give an explicit mask
(`attention_mask`, e.g. several candidate continuations scored in one pass), which takes the dense path.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVView(Protocol):
    def key_positions(self) -> torch.Tensor:
        """int64 [T]: the absolute position of every key this pass attends to, the new tokens included."""
        ...

    def update(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' keys and values (kv [2, n_kv_heads, M, head_dim] fp32: kv[0] keys, already rotated,
        kv[1] values; a strided view) for `layer`, and return the layer's full keys and values
        ([2, n_kv_heads, T, head_dim], fp32 or fp16, contiguous last dim) in the order of key_positions()."""
        ...

    # Optional: a view whose keys are the slots [0, T) of per-layer stores [2, n_kv_heads, capacity, head_dim] (fp16
    # or fp32, contiguous), with the new tokens at consecutive slots, may offer
    #     def slot_stores(self) -> tuple[list[torch.Tensor], int] | None: ...
    # (the stores and the first new slot), and the native decode step then reads and writes them directly.
