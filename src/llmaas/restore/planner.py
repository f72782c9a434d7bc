"""Restore planner (LLMS §5.4, Eq. 4): which missing chunks to recompute and which to read from disk.

Pure: missing chunks + a cost profile -> a plan with its predicted pipelined time. Recompute time depends only on how
many chunks are recomputed and IO time only on bytes, so for each count k the heaviest k chunks are the ones to
recompute; scanning k = 0..n is exact for this model. Ignores how the plan is executed (restore/pipeline.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from llmaas.kv.codec import KVLevel
    from llmaas.restore.cost_model import RestoreProfile


# How a policy restores missing chunks: the cost model's best mix of reads and recompute overlapped (LLMS), reads only
# (Swapping, vLLM), or recompute only (LMK, which writes nothing).
RestoreMode = Literal["pipeline", "io", "recompute"]


@dataclass(frozen=True)
class MissingChunk:
    index: int  # chunk position in the context
    level: KVLevel
    nbytes: int  # true stored bytes (payload + scales), what loading it would read
    must_recompute: bool = False  # file missing, corrupt, or from another model/codec


@dataclass(frozen=True)
class RestorePlan:
    recompute: tuple[int, ...]  # chunk indices, ascending
    load: tuple[int, ...]  # chunk indices, ascending
    predicted_s: float  # max(predicted_recompute_s, predicted_io_s): the two overlap
    predicted_io_s: float
    predicted_recompute_s: float
    io_bytes: int

    @property
    def recompute_chunks(self) -> int:
        return len(self.recompute)


def plan_restore(
    missing: Sequence[MissingChunk],
    profile: RestoreProfile,
    *,
    allow_recompute: bool = True,
    allow_io: bool = True,
) -> RestorePlan:
    """Smallest predicted max(T_re(k + forced), T_IO(bytes not recomputed)); ties go to fewer recomputed chunks.

    allow_io=False recomputes everything (LMK); allow_recompute=False loads all it can (chunks that must be
    recomputed still are).
    """
    if len({c.index for c in missing}) != len(missing):
        raise ValueError("missing chunks must have distinct indices")
    if any(c.nbytes < 0 for c in missing):
        raise ValueError("a chunk's nbytes must be >= 0")
    if not (allow_io or allow_recompute) and missing:
        raise ValueError("with both IO and recompute disallowed, missing chunks cannot be restored")
    if profile.io.slope_s < 0:
        # The heaviest-first rule needs IO time to grow with bytes; a negative slope is a failed profile.
        raise ValueError(f"IO cost slope {profile.io.slope_s} s/byte is negative; run `llmaas profile` again")
    forced = [c.index for c in missing if c.must_recompute]
    optional = sorted((c for c in missing if not c.must_recompute), key=lambda c: (-c.nbytes, c.index))
    n = len(optional)
    rest_bytes = [0] * (n + 1)  # rest_bytes[k]: bytes still to load when the k heaviest are recomputed
    for i in reversed(range(n)):
        rest_bytes[i] = rest_bytes[i + 1] + optional[i].nbytes

    def predict(k: int) -> tuple[float, float]:
        return profile.recompute.predict(k + len(forced)), profile.io.predict(rest_bytes[k])

    lo, hi = (n, n) if not allow_io else (0, 0) if not allow_recompute else (0, n)
    k = min(range(lo, hi + 1), key=lambda k: (max(predict(k)), k))
    recompute_s, io_s = predict(k)
    return RestorePlan(
        recompute=tuple(sorted(forced + [c.index for c in optional[:k]])),
        load=tuple(sorted(c.index for c in optional[k:])),
        predicted_s=max(recompute_s, io_s),
        predicted_io_s=io_s,
        predicted_recompute_s=recompute_s,
        io_bytes=rest_bytes[k],
    )


def plan_for_mode(missing: Sequence[MissingChunk], profile: RestoreProfile | None, mode: RestoreMode) -> RestorePlan:
    """The plan a restore mode asks for. With a profile, plan_restore within the mode's limits; without one (io and
    recompute need no cost model), everything is read, or everything recomputed; chunks that must be recomputed
    always are."""
    if profile is not None:
        return plan_restore(missing, profile, allow_recompute=mode != "io", allow_io=mode != "recompute")
    if mode == "pipeline":
        raise ValueError("the pipelined restore needs a restore profile; run `llmaas profile`")
    recompute = tuple(sorted(c.index for c in missing if c.must_recompute or mode == "recompute"))
    load = tuple(sorted(c.index for c in missing if c.index not in recompute))
    io_bytes = sum(c.nbytes for c in missing if c.index in load)
    return RestorePlan(recompute, load, 0.0, 0.0, 0.0, io_bytes)
