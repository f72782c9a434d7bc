"""Memory policies: LLMS, its ablations and the paper's four baselines, as data the one chunked store obeys.

Owns what differs between the systems the benchmark compares (base precision, whether low-density chunks are
requantized, ahead-of-time write-back, victim order, whether a killed context is written at all, how missing chunks
are restored) and the settings shared by all (chunk size, ratio_global, objective). Ignores the mechanics, which live
in the store, so a benchmark swaps a policy, never a code path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from llmaas.errors import InvalidRequestError
from llmaas.kv.codec import KVLevel
from llmaas.memory.kv_levels import OBJECTIVES, Objective
from llmaas.restore.planner import RestoreMode

VictimOrder = Literal["lctru", "lru", "context"]  # LCTRU sub-queues; plain chunk LRU; whole least recently used context
# The Literals (RestoreMode is the planner's) are what the type checker sees; these tuples are what __post_init__
# checks at run time (a policy may be built from untyped input), derived from the Literals so the two never disagree.
VICTIM_ORDERS: tuple[VictimOrder, ...] = get_args(VictimOrder)
RESTORES: tuple[RestoreMode, ...] = get_args(RestoreMode)


@dataclass(frozen=True)
class MemoryPolicy:
    name: str
    base_level: KVLevel = KVLevel.INT8  # every sealed chunk starts here; FP16 is lossless
    compress: bool = True  # requantize low-density chunks to INT4/INT2 under ratio_global
    ahead_of_time: bool = True  # write modified chunks in the background after each call, so eviction is free
    victim_order: VictimOrder = "lctru"
    writes_on_evict: bool = True  # False: a victim is dropped and later recomputed (LMK)
    whole_context_io: bool = False  # Swapping: the whole context is written at eviction (not only dirty chunks)
    restore: RestoreMode = "pipeline"
    chunk_tokens: int = 16
    ratio_global: float = 0.5
    objective: Objective = "density_error"
    layers_per_step: int = 1  # pipeline granularity: layers read per IO/compute synchronisation

    def __post_init__(self) -> None:
        if self.victim_order not in VICTIM_ORDERS:
            raise InvalidRequestError(f"victim order must be one of {VICTIM_ORDERS}; got {self.victim_order!r}")
        if self.restore not in RESTORES:
            raise InvalidRequestError(f"restore must be one of {RESTORES}; got {self.restore!r}")
        if self.objective not in OBJECTIVES:
            raise InvalidRequestError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}")
        if not 0.25 <= self.ratio_global <= 1.0:
            raise InvalidRequestError(f"ratio_global must lie in [0.25, 1]; got {self.ratio_global}")
        if self.chunk_tokens < 1 or self.layers_per_step < 1:
            raise InvalidRequestError("chunk_tokens and layers_per_step must be >= 1")
        if self.compress and self.base_level != KVLevel.INT8:
            raise InvalidRequestError("compression requantizes from the INT8 base; use base_level INT8")
        if not self.writes_on_evict and self.restore != "recompute":
            raise InvalidRequestError("a policy that never writes must restore by recompute")

    def with_settings(self, **changes: object) -> MemoryPolicy:
        # mypy's dataclass plugin checks each keyword against its field's type, which `object` cannot satisfy. The
        # changes are chosen at run time: replace() rejects unknown names and __post_init__ invalid choices.
        return replace(self, **changes)  # type: ignore[arg-type]


# The systems of LLMS.md §8 (baselines, our precision and victim decisions) and the ablations of Fig. 13.
POLICIES: dict[str, MemoryPolicy] = {p.name: p for p in (
    MemoryPolicy("llms"),
    # LLMS's mechanisms with exact KV (FP16, as the working buffer holds it): a restored context continues exactly as
    # if it had never left memory, at twice INT8's bytes. For apps, tests and checks that need bit-exact replies.
    MemoryPolicy("llms-lossless", base_level=KVLevel.FP16, compress=False),
    MemoryPolicy("llms-no-compression", compress=False),
    MemoryPolicy("llms-no-pipeline", restore="io"),
    MemoryPolicy("llms-no-lifecycle", ahead_of_time=False, victim_order="lru"),
    MemoryPolicy("lmk", base_level=KVLevel.FP16, compress=False, ahead_of_time=False, victim_order="context",
                 writes_on_evict=False, restore="recompute"),
    MemoryPolicy("swapping", base_level=KVLevel.FP16, compress=False, ahead_of_time=False, victim_order="context",
                 whole_context_io=True, restore="io"),
    MemoryPolicy("vllm-s", base_level=KVLevel.FP16, compress=False, ahead_of_time=False, victim_order="lru",
                 restore="io"),
    MemoryPolicy("vllm-sq", compress=False, ahead_of_time=False, victim_order="lru", restore="io"),
)}


def policy_named(name: str) -> MemoryPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise InvalidRequestError(f"unknown memory policy {name!r}; choose one of {sorted(POLICIES)}") from None
