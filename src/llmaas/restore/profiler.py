"""Install-time restore profile (LLMS §5.3): measured recompute seconds per chunk count and read seconds per byte.

Owns the measurement: a synthetic context of real text is prefilled once; recompute of x scattered chunks is timed for
x in {1, 2, 4, ..., 64}; the context's chunks are written to a scratch chunk log (page cache dropped, the active disk
throttle applied) and cold reads of growing runs of chunks are timed; both are fitted by least squares, with progress
lines (step count, time left) on stderr. A profile is checked whenever it is loaded or measured: a fresh one that
fails is measured once more, and one that still fails is used with a warning. Ignores when to re-profile otherwise
(the caller decides; `llmaas profile --refresh` measures again).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmaas.kv.chunking import contiguous_spans, cut_chunks
from llmaas.kv.codec import ChunkGeometry, KVLevel, encode
from llmaas.kv.dense import DenseKVCache
from llmaas.model.transformer import Transformer
from llmaas.paths import cache_dir
from llmaas.restore.cost_model import ProfileError, RestoreProfile, check_profile, fit_linear, profile_path
from llmaas.restore.pipeline import LoadItem, restore
from llmaas.storage.chunk_log import ChunkLog, ChunkRecord
from llmaas.storage.throttle import DiskThrottle

CHUNK_COUNTS = (1, 2, 4, 8, 16, 32, 64)


class _StepClock:
    """Progress lines with a step count and the time left. Steps declare their work in units of their phase (chunks
    prefilled or recomputed, chunks read); the time left is the work left at the seconds per unit of each phase's
    latest step (the steps grow, so a fixed cost weighs less in each; a step's repeats count at their median, so a
    first call's warm-up does not either), and a phase not yet begun counts as free (reads are a few % of a
    profile without a disk throttle)."""

    def __init__(self, steps: list[tuple[str, float]]) -> None:
        self.steps = steps  # (phase, units of work), in the order they run
        self.num_done = 0
        self.unit_s: dict[str, float] = {}

    def done(self, line: str, step_s: float) -> None:
        """The next step has finished, in about step_s: report it."""
        phase, units = self.steps[self.num_done]
        self.unit_s[phase] = step_s / units
        self.num_done += 1
        left_s = sum(u * self.unit_s.get(p, 0.0) for p, u in self.steps[self.num_done:])
        _progress(f"{line} [{self.num_done}/{len(self.steps)}, ~{left_s:.0f} s left]")


def measure_profile(model: Transformer, geometry: ChunkGeometry, model_id: str, codec: str,
                    throttle: DiskThrottle | None, context_tokens: int, repeats: int = 1,
                    io_repeats: int = 5) -> RestoreProfile:
    """Measure and fit both cost models (about 12 s at 2048 tokens for SmolLM2 on two cores). Cold reads are cheap
    but noisy (a single one can stall for 100 ms on a shared disk), so each load point is the median of
    `io_repeats`."""
    size = geometry.chunk_tokens
    n_chunks = context_tokens // size
    counts = [x for x in CHUNK_COUNTS if x <= n_chunks]
    # A recomputed chunk costs 1.5-2x a prefilled one (its rows attend to the whole context; measured on two cores):
    # so weighted, the prefill gives the first estimate of the recompute steps' time.
    clock = _StepClock([("compute", n_chunks / 2), *[("compute", x) for x in counts],
                        *[("read", x * io_repeats) for x in counts]])
    ids = torch.randint(100, model.config.vocab_size - 100, (n_chunks * size,),
                        generator=torch.Generator().manual_seed(0))
    cache = DenseKVCache(geometry.spec, len(ids))
    t0 = time.perf_counter()
    model.run_layers(model.embed(ids), torch.arange(len(ids)), cache.append(len(ids)))
    clock.done(f"prefill {len(ids)} tokens", time.perf_counter() - t0)
    re_points = []
    for x in counts:
        spans = [(i * size, size) for i in _spread(x, n_chunks)]
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            restore(model, cache, None, geometry, (), spans, ids.tolist())  # type: ignore[arg-type]
            t.append(time.perf_counter() - t0)
        re_points.append((float(x), statistics.median(t)))
        clock.done(f"recompute {x} chunks: {re_points[-1][1] * 1e3:.1f} ms", re_points[-1][1] * repeats)
    k, v = cut_chunks(cache.kv, contiguous_spans(n_chunks * size, size), size)
    payload = encode(k, v, KVLevel.INT8, geometry)
    io_points = []
    with tempfile.TemporaryDirectory(prefix="llmaas-profile-") as tmp:
        log = ChunkLog(Path(tmp), model_id, codec, throttle=throttle)
        layers, section = geometry.spec.n_layers, geometry.section_bytes(KVLevel.INT8)
        records = [ChunkRecord(i, 1, int(KVLevel.INT8), i * size, (i + 1) * size, size, bytes(16), layers, section,
                               payload[i].reshape(-1)) for i in range(n_chunks)]
        locations = log.write("profile", records)
        for x in counts:
            # Contiguous chunks: the model is seconds per byte, and spread-out chunks would be read with the gaps
            # between them (the chunk log merges nearby ranges), which bytes cannot describe.
            items = [LoadItem(i, locations[i], KVLevel.INT8, i * size, size) for i in range(x)]
            t = []
            for _ in range(io_repeats):
                t0 = time.perf_counter()
                restore(model, cache, log, geometry, items, (), ids.tolist())
                t.append(time.perf_counter() - t0)
            io_points.append((float(x * geometry.payload_bytes(KVLevel.INT8)), statistics.median(t)))
            clock.done(f"read {x} chunks ({io_points[-1][0] / 2**20:.1f} MiB): {io_points[-1][1] * 1e3:.1f} ms",
                       io_points[-1][1] * io_repeats)
        log.close()
    throttle_name = throttle.describe() if throttle is not None else "none"
    re_fit = fit_linear([x for x, _ in re_points], [y for _, y in re_points])
    io_fit = fit_linear([x for x, _ in io_points], [y for _, y in io_points])
    return RestoreProfile(model_id, codec, size, throttle_name, re_fit, io_fit, context_tokens,
                          recompute_points=tuple(re_points), io_points=tuple(io_points))


def ensure_profile(model: Transformer, geometry: ChunkGeometry, model_id: str, profiles_dir: Path,
                   throttle: DiskThrottle | None, context_tokens: int, refresh: bool = False) -> RestoreProfile:
    """The stored profile for these settings, measured (and stored) first if there is none or refresh is asked.
    A profile describes this machine and model, not a data directory, so one measured for another data directory
    on this machine (kept in the cache directory too) is reused rather than measured again.

    Recompute is measured in a context of `context_tokens` (the longest one served): each recomputed row attends to
    the whole context, and at 2048 tokens a chunk costs 1.6x what it does at 1024 here. A profile measured at a
    shorter length would make the planner recompute too much; one measured at a longer length only errs toward IO."""
    codec = codec_id(geometry)
    throttle_name = throttle.describe() if throttle is not None else "none"
    key = (model_id, codec, geometry.chunk_tokens, throttle_name)
    path = profile_path(profiles_dir, *key)
    machine_copy = profile_path(cache_dir() / "profiles", *key)
    for candidate in () if refresh else (path, machine_copy):
        profile = _load_usable(candidate, key, context_tokens)
        if profile is not None:
            if candidate != path:
                profile.save(path)
            _warn_if_implausible(profile, candidate)
            return profile
    _progress(f"measuring the restore profile once for {model_id} (throttle {throttle_name}; ~15 s on two idle "
              f"cores, more under load), stored in {path}")
    profile = measure_profile(model, geometry, model_id, codec, throttle, context_tokens)
    problems = check_profile(profile)
    if problems:  # most likely something else ran meanwhile: a second try usually gets a clean one
        _progress(f"the measured profile is implausible ({'; '.join(problems)}); measuring once more")
        profile = measure_profile(model, geometry, model_id, codec, throttle, context_tokens)
    # Stored even if still implausible: each start then warns, rather than spend another minute measuring.
    profile.save(path)
    profile.save(machine_copy)
    _warn_if_implausible(profile, path)
    return profile


def _load_usable(path: Path, key: tuple[str, str, int, str], context_tokens: int) -> RestoreProfile | None:
    """The profile stored at path if it is for these settings and measured at context_tokens or more, else None."""
    if not path.exists():
        return None
    model_id, codec, chunk_tokens, throttle = key
    try:
        profile = RestoreProfile.load(path, model_id=model_id, codec=codec, chunk_tokens=chunk_tokens,
                                      throttle=throttle)
    except ProfileError as exc:
        _progress(f"{exc}; measuring again")
        return None
    if profile.context_tokens < context_tokens:
        _progress(f"{path} was measured at {profile.context_tokens} tokens, less than {context_tokens}; measuring "
                  "again")
        return None
    return profile


def _warn_if_implausible(profile: RestoreProfile, path: Path) -> None:
    problems = check_profile(profile)
    if problems:
        _progress(f"warning: the restore profile {path} is implausible ({'; '.join(problems)}), so restores may "
                  "read chunks it would be faster to recompute, or the other way round; re-measure it on an idle "
                  "machine with `llmaas profile --refresh` (with the service's --home, --max-context-tokens and "
                  "--disk-throttle-mbps)")


def codec_id(geometry: ChunkGeometry) -> str:
    return f"llmaas-kv/int8-c{geometry.chunk_tokens}"


def _spread(x: int, n: int) -> list[int]:
    """x chunk indices spread evenly over n (non-contiguous, like real restores)."""
    return sorted({round(i * n / x) for i in range(x)})[:x]


def _progress(line: str) -> None:
    print(f"llmaas profile: {line}", file=sys.stderr, flush=True)
