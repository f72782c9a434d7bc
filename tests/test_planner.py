"""Restore cost model and planner (LLMS §5.3-5.4): fits, the profile file and its plausibility check (and what
ensure_profile does about an implausible one), and the planner against brute force."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.spec import KVSpec
from llmaas.restore import profiler
from llmaas.restore.cost_model import (
    LinearCost,
    ProfileError,
    RestoreProfile,
    check_profile,
    fit_linear,
    load_profile,
    profile_key,
    profile_path,
)
from llmaas.restore.planner import MissingChunk, RestorePlan, plan_restore

CHUNK_BYTES = {KVLevel.INT8: 198_720, KVLevel.INT4: 120_960, KVLevel.INT2: 74_880}


def make_profile(recompute: LinearCost, io: LinearCost, **overrides) -> RestoreProfile:
    fields = dict(model_id="smollm2-135m:abc123", codec="int8", chunk_tokens=16, throttle="none", context_tokens=1024)
    return RestoreProfile(recompute=recompute, io=io, **(fields | overrides))


def measured_profile(recompute_points: list[tuple[float, float]], io_points: list[tuple[float, float]],
                     **overrides) -> RestoreProfile:
    """A profile as measure_profile makes one: the points and their least-squares lines."""
    return make_profile(fit_linear(*zip(*recompute_points, strict=True)), fit_linear(*zip(*io_points, strict=True)),
                        recompute_points=tuple(recompute_points), io_points=tuple(io_points), **overrides)


CHUNKS = [1, 2, 4, 8, 16, 32, 64]
# Measured by the profiler for SmolLM2 on this repo's two idle cores: recompute of x chunks scattered over 2048 tokens,
# and cold reads of x INT8 chunks.
CLEAN_RECOMPUTE = list(zip(CHUNKS, [0.1260, 0.1532, 0.2507, 0.4310, 0.7706, 1.460, 2.668], strict=True))
CLEAN_READ = list(zip([x * CHUNK_BYTES[KVLevel.INT8] for x in CHUNKS],
                      [0.002817, 0.003059, 0.004221, 0.004580, 0.007024, 0.01692, 0.02932], strict=True))
# The same recompute measured while other jobs kept both cores busy: from 8 chunks on, each point paid a ~5 s stall.
LOADED_RECOMPUTE = list(zip(CHUNKS, [0.6536, 0.4554, 0.8692, 5.711, 7.176, 8.520, 10.23], strict=True))


def random_missing(rng: np.random.Generator, n: int) -> list[MissingChunk]:
    indices = sorted(int(i) for i in rng.choice(64, n, replace=False))
    chunks = []
    for i in indices:
        level = list(CHUNK_BYTES)[int(rng.integers(3))]
        nbytes = CHUNK_BYTES[level] if rng.random() < 0.7 else int(rng.integers(0, 200_000))
        chunks.append(MissingChunk(i, level, nbytes, must_recompute=bool(rng.random() < 0.2)))
    return chunks


def brute_force(missing: list[MissingChunk], profile: RestoreProfile) -> tuple[float, int]:
    """(best predicted seconds, fewest optional chunks recomputed at that time) over every subset."""
    forced = sum(c.must_recompute for c in missing)
    optional = [c for c in missing if not c.must_recompute]
    best = None
    for mask in itertools.product((False, True), repeat=len(optional)):
        k = sum(mask)
        rest = sum(c.nbytes for c, re in zip(optional, mask, strict=True) if not re)
        t = max(profile.recompute.predict(k + forced), profile.io.predict(rest))
        best = min(best or (t, k), (t, k))
    assert best is not None
    return best


def check_plan(plan: RestorePlan, missing: list[MissingChunk], profile: RestoreProfile) -> None:
    assert sorted(plan.recompute + plan.load) == sorted(c.index for c in missing)
    assert {c.index for c in missing if c.must_recompute} <= set(plan.recompute)
    assert plan.io_bytes == sum(c.nbytes for c in missing if c.index in plan.load)
    assert plan.predicted_recompute_s == profile.recompute.predict(len(plan.recompute))
    assert plan.predicted_io_s == profile.io.predict(plan.io_bytes)
    assert plan.predicted_s == max(plan.predicted_recompute_s, plan.predicted_io_s)


def test_planner_equals_brute_force_over_every_subset() -> None:
    rng = np.random.default_rng(8)
    for case in range(400):
        missing = random_missing(rng, int(rng.integers(0, 9)))
        # Negative intercepts clamp small predictions to 0, which makes exact ties between counts.
        recompute = LinearCost(float(rng.uniform(-0.1, 0.05)), float(rng.uniform(0.001, 0.05)))
        io = LinearCost(float(rng.uniform(-0.1, 0.02)), float(rng.uniform(1e-9, 1e-6)))
        profile = make_profile(recompute, io)
        plan = plan_restore(missing, profile)
        check_plan(plan, missing, profile)
        best_s, fewest = brute_force(missing, profile)
        assert plan.predicted_s == best_s, case
        assert sum(1 for c in missing if c.index in plan.recompute and not c.must_recompute) == fewest, case


def test_planner_recomputes_heaviest_first_and_honours_flags() -> None:
    # IO at 1 s per INT8 chunk, recompute 0.5 s per chunk: recompute the two INT8 chunks, read the INT2 ones.
    profile = make_profile(LinearCost(0.0, 0.5), LinearCost(0.0, 1.0 / CHUNK_BYTES[KVLevel.INT8]))
    missing = [
        MissingChunk(0, KVLevel.INT2, CHUNK_BYTES[KVLevel.INT2]),
        MissingChunk(1, KVLevel.INT8, CHUNK_BYTES[KVLevel.INT8]),
        MissingChunk(2, KVLevel.INT2, CHUNK_BYTES[KVLevel.INT2]),
        MissingChunk(3, KVLevel.INT8, CHUNK_BYTES[KVLevel.INT8]),
        MissingChunk(4, KVLevel.INT4, CHUNK_BYTES[KVLevel.INT4], must_recompute=True),
    ]
    plan = plan_restore(missing, profile)
    assert (plan.recompute, plan.load, plan.recompute_chunks) == ((1, 3, 4), (0, 2), 3)
    assert plan.predicted_s == pytest.approx(1.5)
    lmk = plan_restore(missing, profile, allow_io=False)
    assert (lmk.recompute, lmk.load, lmk.io_bytes, lmk.predicted_io_s) == ((0, 1, 2, 3, 4), (), 0, 0.0)
    io_only = plan_restore(missing, profile, allow_recompute=False)
    assert (io_only.recompute, io_only.load) == ((4,), (0, 1, 2, 3))
    for p in (plan, lmk, io_only):
        check_plan(p, missing, profile)
    assert plan_restore([], profile) == RestorePlan((), (), 0.0, 0.0, 0.0, 0)


def test_planner_errors() -> None:
    profile = make_profile(LinearCost(0.0, 0.5), LinearCost(0.0, 1e-6))
    chunk = MissingChunk(0, KVLevel.INT8, 10)
    with pytest.raises(ValueError, match="distinct"):
        plan_restore([chunk, chunk], profile)
    with pytest.raises(ValueError, match="cannot be restored"):
        plan_restore([chunk], profile, allow_io=False, allow_recompute=False)
    with pytest.raises(ValueError, match="llmaas profile"):
        plan_restore([chunk], make_profile(LinearCost(0.0, 0.5), LinearCost(0.0, -1e-6)))


def test_linear_cost_predict() -> None:
    cost = LinearCost(intercept_s=0.01, slope_s=0.002)
    assert cost.predict(0) == 0.0  # no work, no time, despite the intercept
    assert cost.predict(10) == pytest.approx(0.03)
    assert LinearCost(-0.05, 0.001).predict(1) == 0.0  # never negative
    with pytest.raises(ValueError):
        cost.predict(-1)


def test_fit_linear_recovers_coefficients() -> None:
    xs = [1, 2, 4, 8, 16, 32, 64]
    exact = fit_linear(xs, [0.02 + 0.003 * x for x in xs])
    assert exact.intercept_s == pytest.approx(0.02, abs=1e-12) and exact.slope_s == pytest.approx(0.003, abs=1e-12)
    assert exact.r2 == pytest.approx(1.0) and exact.max_abs_residual_s < 1e-12 and exact.n_points == 7

    rng = np.random.default_rng(9)
    noise = rng.normal(0.0, 0.002, len(xs))
    noisy = fit_linear(xs, [0.02 + 0.003 * x + e for x, e in zip(xs, noise, strict=True)])
    assert noisy.slope_s == pytest.approx(0.003, rel=0.05) and noisy.intercept_s == pytest.approx(0.02, abs=0.005)
    assert 0.99 < noisy.r2 < 1.0 and noisy.max_abs_residual_s > 0
    assert fit_linear([1, 2, 3], [5.0, 5.0, 5.0]).r2 == 1.0
    with pytest.raises(ValueError, match="distinct"):
        fit_linear([4, 4], [1.0, 2.0])


def test_profile_round_trip_and_key_check(tmp_path) -> None:
    xs, ys = [1, 2, 4, 8], [0.031, 0.052, 0.089, 0.171]
    sizes, secs = [198_720, 397_440, 794_880], [0.0012, 0.0021, 0.0040]
    profile = make_profile(
        fit_linear(xs, ys),
        fit_linear(sizes, secs),
        recompute_points=tuple(zip(map(float, xs), ys, strict=True)),
        io_points=tuple(zip(map(float, sizes), secs, strict=True)),
    )
    assert RestoreProfile.from_json(profile.to_json()) == profile
    assert json.loads(profile.to_json())["format_version"] == 1

    path = profile_path(tmp_path / "profiles", "smollm2-135m:abc123", "int8", 16, "none")
    assert path.name == f"{profile.key}.json"
    profile.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert load_profile(tmp_path / "profiles", "smollm2-135m:abc123", "int8", 16, "none") == profile
    with pytest.raises(ProfileError, match=r"throttle='none' \(want 'read 50 MB/s'\).*llmaas profile"):
        RestoreProfile.load(path, throttle="read 50 MB/s")
    with pytest.raises(ProfileError, match="llmaas profile"):
        load_profile(tmp_path / "profiles", "smollm2-135m:abc123", "int4", 16, "none")  # no such file
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="unreadable"):
        RestoreProfile.load(path)


def test_profile_key_is_file_safe_and_distinct() -> None:
    a, b = profile_key("m/x", "int8", 16, "read 50 MB/s"), profile_key("m x", "int8", 16, "read 50 MB/s")
    assert a != b and all(ch.isalnum() or ch in "._-" for ch in a)
    assert profile_key("m", "int8", 16, "none") != profile_key("m", "int8", 32, "none")


def test_check_profile_passes_clean_points_and_flat_noise() -> None:
    assert check_profile(measured_profile(CLEAN_RECOMPUTE, CLEAN_READ)) == []
    # reads from a fast disk are all intercept: a ms of jitter, up or down, is noise
    flat = [(b, 0.004 + e) for (b, _), e in zip(CLEAN_READ, [1e-3, -8e-4, 5e-4, -1e-3, 0.0, 9e-4, 2e-4], strict=True)]
    assert check_profile(measured_profile(CLEAN_RECOMPUTE, flat)) == []
    assert check_profile(make_profile(LinearCost(0.0, 0.04), LinearCost(0.0, 2e-9))) == []  # no points: no check


def test_check_profile_flags_a_time_that_falls_as_the_work_grows() -> None:
    spiked = [(x, 1.2 if x == 8 else y) for x, y in CLEAN_RECOMPUTE]  # something else ran during the 8-chunk point
    problems = check_profile(measured_profile(spiked, CLEAN_READ))
    assert "recompute time falls from 1200.0 ms at 8 chunks to 770.6 ms at 16 chunks" in problems
    faster_last = [(b, 0.010 if b == CLEAN_READ[-1][0] else y) for b, y in CLEAN_READ]
    problems = check_profile(measured_profile(CLEAN_RECOMPUTE, faster_last))
    assert "read time falls from 16.9 ms at 6.1 MiB to 10.0 ms at 12.1 MiB" in problems


def test_check_profile_flags_points_the_line_does_not_predict() -> None:
    curved = [(x, 0.01 * x**1.8) for x in CHUNKS]  # monotone, but no line: this one makes up to 5 chunks free
    assert check_profile(measured_profile(curved, CLEAN_READ)) == [
        "the recompute line predicts 2976.1 ms at 16 chunks, where 1470.3 ms was measured (R^2 0.95)"]
    problems = check_profile(measured_profile(LOADED_RECOMPUTE, CLEAN_READ))
    assert problems == ["recompute time falls from 653.6 ms at 1 chunks to 455.4 ms at 2 chunks",
                        "the recompute line predicts 2332.2 ms at 2 chunks, where 455.4 ms was measured (R^2 0.73)"]


GEOMETRY = ChunkGeometry(KVSpec(30, 3, 64), 16)  # SmolLM2-135M


def ensure(tmp_path) -> RestoreProfile:
    return profiler.ensure_profile(None, GEOMETRY, "smollm2-135m:abc123", tmp_path / "profiles", None, 1024)  # type: ignore[arg-type]


def fake_measurements(tmp_path, monkeypatch, answers: list[RestoreProfile]) -> list[RestoreProfile]:
    """ensure_profile's measurements return `answers` in turn (the list is emptied as they are used; one more
    measurement fails the test with an IndexError)."""
    monkeypatch.setenv("LLMAAS_CACHE", str(tmp_path / "cache"))
    queue = list(answers)
    monkeypatch.setattr(profiler, "measure_profile", lambda *args, **kwargs: queue.pop(0))
    return queue


def test_ensure_profile_measures_an_implausible_profile_once_more(tmp_path, monkeypatch, capsys) -> None:
    codec = profiler.codec_id(GEOMETRY)
    spiked = measured_profile([(x, 1.2 if x == 8 else y) for x, y in CLEAN_RECOMPUTE], CLEAN_READ, codec=codec)
    clean = measured_profile(CLEAN_RECOMPUTE, CLEAN_READ, codec=codec)
    left = fake_measurements(tmp_path, monkeypatch, [spiked, clean])
    assert ensure(tmp_path) == clean and left == []
    err = capsys.readouterr().err
    assert "recompute time falls" in err and "measuring once more" in err and "warning" not in err
    assert ensure(tmp_path) == clean  # stored: the next start measures nothing
    assert capsys.readouterr().err == ""


def test_ensure_profile_warns_about_an_implausible_profile_but_uses_it(tmp_path, monkeypatch, capsys) -> None:
    codec = profiler.codec_id(GEOMETRY)
    curved = measured_profile(LOADED_RECOMPUTE, CLEAN_READ, codec=codec)
    left = fake_measurements(tmp_path, monkeypatch, [curved, curved])
    assert ensure(tmp_path) == curved and left == []
    err = capsys.readouterr().err
    assert "measuring once more" in err and "warning:" in err and "llmaas profile --refresh" in err
    assert ensure(tmp_path) == curved  # loaded: warned about again, not measured again
    err = capsys.readouterr().err
    assert "warning:" in err and "recompute line predicts" in err and "measuring" not in err


def test_modes_without_a_profile_read_or_recompute_everything():
    from llmaas.restore.planner import plan_for_mode

    missing = [MissingChunk(0, KVLevel.INT8, 100), MissingChunk(1, KVLevel.INT4, 50, must_recompute=True),
               MissingChunk(2, KVLevel.INT8, 100)]
    io = plan_for_mode(missing, None, "io")
    assert (io.load, io.recompute, io.io_bytes) == ((0, 2), (1,), 200)  # a chunk that must be recomputed still is
    rec = plan_for_mode(missing, None, "recompute")
    assert (rec.load, rec.recompute, rec.io_bytes) == ((), (0, 1, 2), 0)
    with pytest.raises(ValueError, match="profile"):
        plan_for_mode(missing, None, "pipeline")
