"""Restore cost models (LLMS §5.3): linear fits T_re(chunks) and T_IO(bytes), and the profile file that stores them.

Owns least-squares fitting, prediction (T(0) = 0), the plausibility check of a profile's points (times grow with the
work, the lines fit), and the profile's JSON form, file name and key check. Ignores how the points are measured
(`llmaas profile` does that), what to do about an implausible profile, and what the planner does with the predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import numpy as np

from llmaas.errors import LlmaasError

FORMAT_VERSION = 1
# Noise on one measured time: 25% of it (a clean profile's points sit up to ~18% off their line, measured on two
# cores), or 5 ms (a cold read's stall, a scheduler tick; a recomputed chunk costs ~40 ms here). Within it, a time may
# fall as the work grows and a point may sit off the line; beyond it, the profile was probably measured under load.
NOISE_FRACTION = 0.25
NOISE_FLOOR_S = 0.005


class ProfileError(LlmaasError):
    """The restore profile is missing, unreadable, or was measured for another model, codec, chunk size or throttle."""


@dataclass(frozen=True)
class LinearCost:
    """T(x) = intercept_s + slope_s·x, with the quality of the fit it came from."""

    intercept_s: float
    slope_s: float  # seconds per unit of x (a chunk, or a byte)
    r2: float = 1.0
    max_abs_residual_s: float = 0.0
    n_points: int = 0

    def predict(self, x: float) -> float:
        """0 for x == 0 (no work, no time); never negative (a negative intercept must not make work free)."""
        if x < 0:
            raise ValueError(f"cost of a negative amount ({x}) is undefined")
        return 0.0 if x == 0 else max(0.0, self.intercept_s + self.slope_s * x)


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearCost:
    """Least-squares line with intercept, with R² and the largest absolute residual."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got shapes {x.shape} and {y.shape}")
    if len(np.unique(x)) < 2:
        raise ValueError("a line needs points at two or more distinct x")
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    ss_res, ss_tot = float(residuals @ residuals), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0  # constant ys: the flat fitted line is exact up to rounding
    return LinearCost(float(intercept), float(slope), r2, float(np.abs(residuals).max()), len(x))


def profile_key(model_id: str, codec: str, chunk_tokens: int, throttle: str) -> str:
    """A file-name-safe key; the hash keeps two settings apart even when sanitising makes their names alike."""
    raw = json.dumps([model_id, codec, chunk_tokens, throttle])
    digest = hashlib.sha256(raw.encode()).hexdigest()[:10]
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", part)[:48] for part in (model_id, codec, f"c{chunk_tokens}", throttle)]
    return "-".join([*safe, digest])


@dataclass(frozen=True)
class RestoreProfile:
    model_id: str
    codec: str
    chunk_tokens: int
    throttle: str  # the disk throttle active while profiling, e.g. "none" or "read 50 MB/s"
    recompute: LinearCost  # x = number of chunks recomputed
    io: LinearCost  # x = bytes read
    context_tokens: int  # context length the recompute points were measured at
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    recompute_points: tuple[tuple[float, float], ...] = ()  # (chunks, seconds)
    io_points: tuple[tuple[float, float], ...] = ()  # (bytes, seconds)

    @property
    def key(self) -> str:
        return profile_key(self.model_id, self.codec, self.chunk_tokens, self.throttle)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> RestoreProfile:
        data = json.loads(text)
        if data.pop("format_version", None) != FORMAT_VERSION:
            raise ProfileError(f"restore profile format is not version {FORMAT_VERSION}; run `llmaas profile` again")
        data["recompute"], data["io"] = LinearCost(**data["recompute"]), LinearCost(**data["io"])
        for name in ("recompute_points", "io_points"):
            data[name] = tuple((float(x), float(y)) for x, y in data[name])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Atomic: a reader sees the old file or the new one, never a partial one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model_id: str | None = None,
        codec: str | None = None,
        chunk_tokens: int | None = None,
        throttle: str | None = None,
    ) -> RestoreProfile:
        """Read a profile; each key field given must match what it was measured for."""
        path = Path(path)
        try:
            profile = cls.from_json(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no restore profile at {path}; run `llmaas profile` first") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ProfileError(f"restore profile {path} is unreadable ({e}); run `llmaas profile` again") from e
        expected = {"model_id": model_id, "codec": codec, "chunk_tokens": chunk_tokens, "throttle": throttle}
        wrong = [
            f"{k}={getattr(profile, k)!r} (want {v!r})"
            for k, v in expected.items()
            if v is not None and getattr(profile, k) != v
        ]
        if wrong:
            raise ProfileError(f"restore profile {path} was measured for {', '.join(wrong)}; run `llmaas profile`")
        return profile


def check_profile(profile: RestoreProfile) -> list[str]:
    """What makes the profile implausible, one sentence each (none: it is fine): recompute time must grow with the
    chunks and read time with the bytes, and each line must predict each of its points within noise."""
    return [
        *_check_curve("recompute", profile.recompute, profile.recompute_points, lambda x: f"{x:.0f} chunks"),
        *_check_curve("read", profile.io, profile.io_points, lambda x: f"{x / 2**20:.1f} MiB"),
    ]


def _noise_s(measured_s: float) -> float:
    return max(NOISE_FLOOR_S, NOISE_FRACTION * measured_s)


def _check_curve(name: str, fit: LinearCost, points: Sequence[tuple[float, float]],
                 amount: Callable[[float], str]) -> list[str]:
    if not points:  # only hand-made profiles lack them
        return []
    problems = [
        f"{name} time falls from {y0 * 1e3:.1f} ms at {amount(x0)} to {y1 * 1e3:.1f} ms at {amount(x1)}"
        for (x0, y0), (x1, y1) in pairwise(sorted(points))
        if y0 - y1 > _noise_s(y0)
    ]
    x, y = max(points, key=lambda p: abs(fit.predict(p[0]) - p[1]) - _noise_s(p[1]))  # the worst miss
    if abs(fit.predict(x) - y) > _noise_s(y):
        problems.append(f"the {name} line predicts {fit.predict(x) * 1e3:.1f} ms at {amount(x)}, where "
                        f"{y * 1e3:.1f} ms was measured (R^2 {fit.r2:.2f})")
    return problems


def profile_path(profiles_dir: str | Path, model_id: str, codec: str, chunk_tokens: int, throttle: str) -> Path:
    return Path(profiles_dir) / f"{profile_key(model_id, codec, chunk_tokens, throttle)}.json"


def load_profile(
    profiles_dir: str | Path, model_id: str, codec: str, chunk_tokens: int, throttle: str
) -> RestoreProfile:
    """The profile for these settings from `profiles_dir`, or a ProfileError saying to run `llmaas profile`."""
    path = profile_path(profiles_dir, model_id, codec, chunk_tokens, throttle)
    return RestoreProfile.load(path, model_id=model_id, codec=codec, chunk_tokens=chunk_tokens, throttle=throttle)
