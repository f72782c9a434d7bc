"""A context's KV as chunks: what each chunk is (span, level, version, where its bytes are) and the context around it.

Owns per-chunk state (resident encoded payload, the open chunk's exact staging copy, version vs committed version, so
"dirty" and "clean" are facts, not flags) and per-context state (chunks in order, tokens covered, density accumulators,
the working-set lock). Ignores how chunks move: the store decides, the codec encodes, the chunk log stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from llmaas.kv.codec import KVLevel
from llmaas.storage.chunk_index import ChunkLocation


@dataclass(eq=False)
class Chunk:
    index: int
    token_start: int
    fill: int  # tokens held; == chunk_tokens once sealed
    level: KVLevel
    prefix_hash: bytes  # of every token id up to the chunk's end: KV built for other tokens is never used
    payload: torch.Tensor | None = None  # encoded bytes, all layers (uint8 [n_layers * section_bytes]) when resident
    staging: torch.Tensor | None = None  # open chunk's exact values ([2, n_layers, Hkv, fill, D] fp16), resident
    version: int = 0  # bumped whenever the content (tokens or level) changes
    committed_version: int | None = None  # the version the chunk log holds, if any
    location: ChunkLocation | None = None  # the chunk log's location of the committed version

    @property
    def is_resident(self) -> bool:
        return self.payload is not None

    @property
    def resident_payload(self) -> torch.Tensor:
        """The payload of a chunk the caller knows is resident (is_resident, or is_dirty, which implies it)."""
        assert self.payload is not None, f"chunk {self.index} is not resident"
        return self.payload

    @property
    def disk_location(self) -> ChunkLocation:
        """The location of a chunk the caller knows is on disk (is_on_disk implies it)."""
        assert self.location is not None, f"chunk {self.index} has no disk copy"
        return self.location

    @property
    def is_dirty(self) -> bool:
        """Resident and newer than the disk copy: evicting it needs a write first."""
        return self.payload is not None and self.committed_version != self.version

    @property
    def is_on_disk(self) -> bool:
        """The disk copy is the current content (it can be loaded instead of recomputed)."""
        return self.committed_version == self.version and self.location is not None

    @property
    def resident_bytes(self) -> int:
        held = 0 if self.payload is None else self.payload.nbytes
        return held + (0 if self.staging is None else self.staging.nbytes)


@dataclass(eq=False)
class ContextKV:
    id: str
    chunks: list[Chunk] = field(default_factory=list)
    prob_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # attention each token received (Eq. 1 sums)
    row_count: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (layer, head, row) triples that saw it
    locked: bool = False  # the working-set lock: none of its chunks may be reclaimed during its call
    dropped: bool = False  # deleted during its call: release() forgets it instead of sealing it

    @property
    def token_count(self) -> int:
        return self.chunks[-1].token_start + self.chunks[-1].fill if self.chunks else 0

    @property
    def resident_bytes(self) -> int:
        return sum(c.resident_bytes for c in self.chunks)

    def chunk_densities(self) -> list[float]:
        """Mean token density d(t) = prob_sum / row_count over each chunk (Eq. 1)."""
        d = np.divide(self.prob_sum, self.row_count, out=np.zeros_like(self.prob_sum), where=self.row_count > 0)
        return [float(d[c.token_start:c.token_start + c.fill].mean()) for c in self.chunks]

    def add_attention(self, prob_sum: np.ndarray, row_count: np.ndarray) -> None:
        """Fold one call's per-token attention into the running sums (tokens beyond the old end start at zero)."""
        n = len(prob_sum)
        for name, new in (("prob_sum", prob_sum), ("row_count", row_count)):
            old = getattr(self, name)
            grown = np.zeros(n)
            grown[:min(n, len(old))] = old[:n]
            setattr(self, name, grown + new)


def prefix_hashes(token_ids: Sequence[int], chunk_tokens: int) -> list[bytes]:
    """The prefix hash of every chunk of token_ids (the last one may be partial)."""
    h = hashlib.blake2b(digest_size=16)
    ids = np.asarray(token_ids, dtype=np.int64)
    out = []
    for start in range(0, len(ids), chunk_tokens):
        h.update(ids[start:start + chunk_tokens].tobytes())
        out.append(h.copy().digest())
    return out
