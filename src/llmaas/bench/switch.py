"""`llmaas bench switch`: the LLMS context-switching benchmark, every system side by side in one run.

Owns the experiment plan and the JSON. The main comparison replays one trace (Markov pattern, 8 active contexts,
budget 2x, maximum length 2048, 16-token chunks, disk unthrottled) against every system: llms, the four baselines and
the three ablations. The sweeps then vary one setting at a time:
- active contexts x pattern;
- budget;
- maximum context length;
- chunk size;
- the disk throttle.

From the contexts sweep come the largest number of active contexts whose mean switch latency stays within 10 ms
and within 25 ms, interpolated between the two counts that bracket the limit.

Budgets are scaled the way the paper's are: its 1 GB holds one maximum-length (4K) Llama2-7B context at INT8, so
here 1x is one 2048-token SmolLM2 context at INT8 (`ChunkedKVStore.minimum_budget_bytes`, 25.8 MB with
16-token chunks), and the default 2x is 51.6 MB. A system whose own minimum is larger (an FP16 policy needs one FP16
context, 47.2 MB) cannot run at 1x and is reported as such.

Ignores replay mechanics (llmaas.bench.replay) and rendering (llmaas.bench.switch_report).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmaas.bench.replay import SystemSetting, replay
from llmaas.bench.trace import Trace, TraceConfig, make_trace
from llmaas.engine.conversation import Conversation
from llmaas.errors import LlmaasError
from llmaas.kv.codec import ChunkGeometry
from llmaas.kv.spec import KVSpec
from llmaas.memory.policy import POLICIES
from llmaas.memory.store import ChunkedKVStore
from llmaas.storage.throttle import DiskThrottle

MAIN_SYSTEMS = ("llms", "lmk", "swapping", "vllm-s", "vllm-sq", "llms-no-compression", "llms-no-pipeline",
                "llms-no-lifecycle")
BASELINES = ("llms", "lmk", "swapping", "vllm-s", "vllm-sq")
REFERENCE = "vllm-s"  # FP16 KV, restored by IO only: bit-identical to never evicting, so its answers are FP16's
LIMITS_S = (0.010, 0.025)
PEER = "swapping (llama.cpp)"
# Results go here unless --out says otherwise: a run from a checkout must not rewrite its tracked docs/ (the repo's
# .gitignore ignores /out/).
DEFAULT_OUT = Path("out")


@dataclass(frozen=True)
class Run:
    sweep: str  # "main", "contexts", "budget", "max_length", "chunk_tokens", "throttle"
    system: str
    pattern: str = "markov"
    contexts: int = 8
    budget_x: float = 2.0
    max_length: int = 2048
    chunk_tokens: int = 16
    throttle_mbps: float | None = None

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Plan:
    calls: int  # calls per replayed trace
    contexts: tuple[int, ...]
    patterns: tuple[str, ...]
    contexts_systems: tuple[str, ...]
    budgets_x: tuple[float, ...]
    budget_contexts: tuple[int, ...]
    budget_systems: tuple[str, ...]
    max_lengths: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    throttle_mbps: float | None  # None: no throttle sweep
    warmup_per_context: int = 3  # unmeasured calls per active context before the measured ones (TraceConfig)

    def runs(self) -> list[Run]:
        runs = [Run("main", s) for s in MAIN_SYSTEMS]
        runs += [Run("contexts", s, p, n) for p in self.patterns for n in self.contexts for s in self.contexts_systems]
        runs += [Run("budget", s, contexts=n, budget_x=b) for b in self.budgets_x for n in self.budget_contexts
                 for s in self.budget_systems]
        runs += [Run("max_length", s, max_length=m) for m in self.max_lengths for s in self.contexts_systems]
        runs += [Run("chunk_tokens", "llms", chunk_tokens=c) for c in self.chunk_sizes]
        if self.throttle_mbps is not None:
            runs += [Run("throttle", s, throttle_mbps=self.throttle_mbps) for s in self.contexts_systems]
        return runs


# The full plan: about 100 replays of 24 calls, measured at 87 minutes on 2 cores. A call averages about 2 s, most of it
# the prompt's prefill and the reply (XSum's 1-2k-token prompts dominate). --calls lengthens the traces.
FULL = Plan(calls=24, contexts=(2, 4, 8, 16), patterns=("random", "markov", "gaussian"), contexts_systems=BASELINES,
            budgets_x=(1.0, 2.0, 3.0), budget_contexts=(4, 8, 16), budget_systems=("llms", "swapping", "vllm-sq"),
            max_lengths=(512, 1024, 2048), chunk_sizes=(4, 8, 16, 32, 64), throttle_mbps=100.0)
# Within 10 minutes on 2 cores (about 8 here): the main comparison, 2/4/8 active contexts for three systems, and the
# budget halved (1x) for the two systems that can run there (an FP16 context does not fit in 1x).
QUICK = Plan(calls=12, contexts=(2, 4, 8), patterns=("markov",), contexts_systems=("llms", "lmk", "vllm-sq"),
             budgets_x=(1.0,), budget_contexts=(8,), budget_systems=("llms", "vllm-sq"), max_lengths=(),
             chunk_sizes=(), throttle_mbps=None)


def budget_bytes(loaded, chunk_tokens: int, max_length: int, budget_x: float) -> int:
    """budget_x maximum-length contexts at the INT8 base (the paper's 1 GB is one 4K Llama2-7B context at INT8)."""
    geometry = ChunkGeometry(KVSpec.from_config(loaded.config), chunk_tokens)
    return int(budget_x * ChunkedKVStore.minimum_budget_bytes(geometry, POLICIES["llms"], max_length))


def execute(loaded, plan: Plan, seed: int, work_dir: Path | None, peer: bool = False) -> dict:
    """Every run of the plan, traces shared between runs that replay the same one; with peer, llama.cpp's own
    swapping replays the main trace too."""
    conversation = Conversation(loaded.tokenizer, loaded.chat_template)
    traces: dict[tuple[str, int], Trace] = {}
    results: dict[str, dict] = {}
    runs = list(dict.fromkeys(plan.runs()))
    started = time.perf_counter()
    for i, run in enumerate(runs):
        tkey = (run.pattern, run.contexts)
        if tkey not in traces:
            traces[tkey] = make_trace(TraceConfig(run.pattern, run.contexts, seed, max_calls=plan.calls,
                                                  warmup_calls=plan.warmup_per_context * run.contexts), conversation)
        same = next((r for r in runs[:i] if _same_replay(r, run) and r.key() in results), None)
        if same is not None:  # e.g. the main run's llms is also the contexts sweep's llms at 8 contexts, markov
            results[run.key()] = results[same.key()]
            continue
        elapsed = time.perf_counter() - started
        print(f"[{i + 1}/{len(runs)}] {run.sweep}: {run.system}, {run.pattern}, {run.contexts} contexts, budget "
              f"{run.budget_x}x, max {run.max_length}, chunk {run.chunk_tokens}, "
              f"{'unthrottled' if run.throttle_mbps is None else f'{run.throttle_mbps:g} MB/s'} ({elapsed:.0f} s)",
              file=sys.stderr, flush=True)
        policy = POLICIES[run.system].with_settings(chunk_tokens=run.chunk_tokens)
        throttle = None if run.throttle_mbps is None else DiskThrottle.from_mb_s(run.throttle_mbps)
        setting = SystemSetting(policy, budget_bytes(loaded, run.chunk_tokens, run.max_length, run.budget_x),
                                run.max_length, throttle)
        try:
            results[run.key()] = replay(loaded, traces[tkey], setting, work_dir, label=run.system)
        except LlmaasError as exc:  # e.g. a budget below what this system needs for one maximum-length context
            results[run.key()] = {"error": str(exc)}
    out = [{"run": asdict(r), "result": results[r.key()]} for r in runs]
    if peer:
        from llmaas.bench.switch_peer import run_peer

        main = Run("main", PEER)
        print(f"[peer] {PEER} on the main trace ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        out.append({"run": asdict(main), "result": run_peer(traces[(main.pattern, main.contexts)], budget_bytes(
            loaded, main.chunk_tokens, main.max_length, main.budget_x), main.max_length, work_dir)})
    return {"runs": out,
            "traces": {f"{p}/{n}": _trace_stats(t) for (p, n), t in traces.items()},
            "wall_s": time.perf_counter() - started}


def _same_replay(a: Run, b: Run) -> bool:
    return {k: v for k, v in asdict(a).items() if k != "sweep"} == {k: v for k, v in asdict(b).items() if k != "sweep"}


def _trace_stats(trace: Trace) -> dict:
    gaps = [c.gap_s for c in trace.calls]
    return {"config": asdict(trace.config), "calls": len(trace.calls), "mean_gap_s": sum(gaps) / len(gaps),
            "switches": sum(1 for c in trace.calls if c.depth > 0), "same_context": sum(c.depth == 0 for c in
                                                                                       trace.calls)}


def shape(raw: dict) -> dict:
    """The results JSON: the main systems, then each sweep as {setting: {system: metrics}}, records kept apart."""
    systems, sweeps, records = {}, {}, {}
    reference = None
    for item in raw["runs"]:
        run, result = Run(**item["run"]), item["result"]
        slim = {k: v for k, v in result.items() if k != "records"}
        if run.sweep == "main":
            systems[run.system] = slim
            records[run.system] = result.get("records", [])
            if run.system == REFERENCE:
                reference = result
            continue
        sweeps.setdefault(run.sweep, {}).setdefault(_setting(run), {})[run.system] = slim
    if reference is not None:  # accuracy against FP16: the reference's scores and exact-answer agreement
        ref_answers = [r["answer"] for r in reference["records"]]
        for name, recs in records.items():
            answers = [r["answer"] for r in recs]
            systems[name]["agree_fp16"] = sum(a == b for a, b in zip(answers, ref_answers, strict=False)) / max(
                1, len(answers))
            systems[name]["accuracy_delta_fp16"] = {t: v - reference["accuracy"].get(t, v)
                                                    for t, v in systems[name].get("accuracy", {}).items()}
    sweeps["max_active_contexts"] = max_active_contexts(sweeps.get("contexts", {}), sweeps.get("budget", {}))
    return {"systems": systems, "sweeps": sweeps, "records": records}


def _setting(run: Run) -> str:
    """The name of a sweep point, e.g. 'markov/8' (pattern/contexts) or '2x/8' (budget/contexts)."""
    if run.sweep == "contexts":
        return f"{run.pattern}/{run.contexts}"
    if run.sweep == "budget":
        return f"{run.budget_x:g}x/{run.contexts}"
    if run.sweep == "throttle":
        return f"{run.throttle_mbps:g} MB/s"
    return str(run.max_length if run.sweep == "max_length" else run.chunk_tokens)


def max_active_contexts(contexts: dict, budget: dict) -> dict:
    """Per pattern (and budget) and system: the most active contexts whose mean switch latency stays within each
    limit, linearly interpolated between the bracketing counts (None: not even the smallest count does)."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for group, prefix in ((contexts, ""), (budget, "budget ")):
        for setting, by_system in group.items():
            name, n = setting.rsplit("/", 1)
            for system, result in by_system.items():
                mean = (result.get("switch_s") or {}).get("mean")
                if mean is not None:
                    curves.setdefault(prefix + name, {}).setdefault(system, []).append((int(n), mean))
    out: dict = {}
    for name, by_system in curves.items():
        for system, points in by_system.items():
            points.sort()
            for limit in LIMITS_S:
                value, beyond = _crossing(points, limit)
                entry = out.setdefault(name, {}).setdefault(system, {})
                entry[f"{limit * 1e3:g}ms"] = value
                entry[f"{limit * 1e3:g}ms_at_least"] = beyond
    return out


def _crossing(points: list[tuple[int, float]], limit: float) -> tuple[float | None, bool]:
    """(contexts at which the curve crosses the limit, whether it never did: the value is then only a lower bound,
    the largest count measured). (None, False): even the smallest count is over."""
    if not points or points[0][1] > limit:
        return None, False
    for (n0, y0), (n1, y1) in itertools.pairwise(points):
        if y1 > limit:
            return (n0 + (n1 - n0) * (limit - y0) / (y1 - y0) if y1 != y0 else float(n0)), False
    return float(points[-1][0]), True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas bench switch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced plan that finishes within 10 minutes on 2 cores")
    p.add_argument("--calls", type=int, help="calls per replayed trace (default: 24; --quick: 12)")
    p.add_argument("--contexts", help="active-context counts of the contexts sweep, e.g. 2,4,6,8,12,16 "
                                      "(default: 2,4,8,16; --quick: 2,4,8)")
    p.add_argument("--max-lengths", help="maximum context lengths of that sweep, e.g. 256,512,1024 (default: 512,1024,"
                                         "2048; none with --quick)")
    p.add_argument("--seed", type=_seeds, default=(42,), metavar="N[,N...]",
                   help="trace seed, or several (e.g. 42,7,1): the plan runs once per seed, each written with a "
                        "_seedN suffix, and a table of the spread across seeds follows (default: 42)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"where to write bench_switch.json, RESULTS.md and the PNGs in switch/ (names end in _quick "
                        f"with --quick; default: ./{DEFAULT_OUT}/). `--out docs` in the repository updates its "
                        "committed results")
    p.add_argument("--peer", action="append", default=[], choices=["llama-cpp"],
                   help="also replay the main trace on llama.cpp's own state save/restore (needs the peers extra)")
    p.add_argument("--work-dir", type=Path, help="where chunk files go (default: a temporary directory)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llmaas.bench.results import machine
    from llmaas.bench.switch_report import print_seed_table, print_table, write_plots, write_results_md
    from llmaas.model.loader import load_model

    plan = QUICK if args.quick else FULL
    changes: dict = {}
    if args.calls is not None:
        changes["calls"] = args.calls
    for name, text in (("contexts", args.contexts), ("max_lengths", args.max_lengths)):
        if text:
            try:
                changes[name] = tuple(int(x) for x in text.split(","))
            except ValueError:
                flag = "--" + name.replace("_", "-")
                raise SystemExit(f"{flag} takes integers separated by commas; got {text!r}") from None
    plan = Plan(**{**asdict(plan), **changes})
    loaded = load_model()
    by_seed = {}
    for seed in args.seed:
        tag = f"_seed{seed}" if len(args.seed) > 1 else ""
        json_path, results_md, plots_dir = output_paths(args.out, args.quick, tag)
        raw = execute(loaded, plan, seed, args.work_dir, peer="llama-cpp" in args.peer)
        result = {"config": {"mode": "quick" if args.quick else "full", "plan": asdict(plan), "seed": seed,
                             "main": asdict(Run("main", "llms")),
                             "budget_1x_bytes": budget_bytes(loaded, 16, 2048, 1.0), "reference": REFERENCE,
                             "machine": machine(), "commit": _commit(), "wall_s": raw["wall_s"],
                             "traces": raw["traces"]},
                  **shape(raw)}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print_table(result)
        plots = write_plots(result, plots_dir)
        write_results_md(result, results_md, json_path, plots)
        print(f"wrote {json_path}, {results_md} and {len(plots)} plots in {plots_dir} ({raw['wall_s']:.0f} s)")
        by_seed[seed] = result
    if len(by_seed) > 1:
        spread = seed_spread(by_seed)
        path = args.out / f"bench_switch{'_quick' if args.quick else ''}_seeds.json"
        path.write_text(json.dumps(spread, indent=1) + "\n")
        print_seed_table(spread)
        print(f"wrote {path}")
    return 0


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers separated by commas; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return seeds


# The comparisons the issue holds each seed to: (system, its setting, the paper's factor over llms, or None).
# The paper's factors (spec §12): Swapping 10-100x, VLLM-S and VLLM-SQ 9.7x on average; LMK "up to 100x" (no mean).
SEED_POINTS = (("lmk", "main", None), ("swapping", "main", 10.0), ("vllm-s", "main", 9.7),
               ("vllm-sq", "main", None), ("vllm-sq", "1x/8", 9.7))


def seed_spread(by_seed: dict[int, dict]) -> dict:
    """Per seed, each compared system's mean switch latency over llms' in the same setting (main: 8 contexts at 2x;
    1x/8: the budget sweep at 1x), with both runs' pressure. A ratio is given only where the compared system was
    under pressure (some switch restored KV): without it the point measured nothing. llms itself may restore nothing
    where the other did, which is compression keeping every context resident; `both_under_pressure` says which."""
    out: dict = {"seeds": list(by_seed), "points": {}}
    for system, where, factor in SEED_POINTS:
        key = f"{system} @ {where}"
        out["points"][key] = {"paper_factor": factor, "by_seed": {}}
        for seed, result in by_seed.items():
            runs = result["systems"] if where == "main" else result["sweeps"].get("budget", {}).get(where, {})
            ours, theirs = runs.get("llms"), runs.get(system)
            if not ours or not theirs or "error" in ours or "error" in theirs:
                out["points"][key]["by_seed"][str(seed)] = {"ratio": None, "why": "not run"}
                continue
            a, b = ours["switch_s"]["mean"], theirs["switch_s"]["mean"]
            informative = theirs["pressure"]["informative"]
            out["points"][key]["by_seed"][str(seed)] = {
                "llms_ms": None if a is None else a * 1e3, "system_ms": None if b is None else b * 1e3,
                "ratio": b / a if informative and a and b else None,
                "llms_restored_fraction": ours["pressure"]["restored_fraction"],
                "system_restored_fraction": theirs["pressure"]["restored_fraction"],
                "informative": informative,
                "both_under_pressure": informative and ours["pressure"]["informative"]}
    return out


def output_paths(out: Path, quick: bool, tag: str = "") -> tuple[Path, Path, Path]:
    """(results JSON, report, PNG directory) under `out`. The names are those the repository keeps in docs/, so
    `--out docs` refreshes them, and a quick run never overwrites a full one; `tag` marks one seed of several."""
    suffix = ("_quick" if quick else "") + tag
    return out / f"bench_switch{suffix}.json", out / f"RESULTS{suffix}.md", out / f"switch{suffix}"


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None
