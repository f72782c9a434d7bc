"""Run the reliability campaigns of a plan, print their table, and write the JSON and (when asked) a report.

Owns the plans (quick and full: rounds, apps, calls, time limits), the order of the campaigns, the verdict per
campaign, the table and the Markdown report. Only campaigns that really ran appear in the JSON. Ignores how each
campaign works (one module each) and argv (llmaas.cli.check).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmaas.bench.results import machine

CAMPAIGNS = ("crash", "disk", "concurrency", "fuzz", "isolation", "soak")


@dataclass(frozen=True)
class Plan:
    name: str
    crash_rounds: int
    concurrency_s: float
    schema_cases: int
    soak_apps: int
    soak_calls_per_app: int
    soak_time_limit_s: float


QUICK = Plan("quick", crash_rounds=10, concurrency_s=60.0, schema_cases=300, soak_apps=4, soak_calls_per_app=50,
             soak_time_limit_s=180.0)
FULL = Plan("full", crash_rounds=100, concurrency_s=600.0, schema_cases=11_000, soak_apps=16,
            soak_calls_per_app=1000, soak_time_limit_s=1800.0)


def campaign_runners(plan: Plan, seed: int) -> dict[str, Callable[[], dict]]:
    # imported here: each campaign pulls in httpx and the client, and `llmaas check --help` should stay instant
    from llmaas.check.concurrency import run_concurrency
    from llmaas.check.crash import CrashCampaign
    from llmaas.check.disk import DiskCampaign
    from llmaas.check.fuzz import run_fuzz
    from llmaas.check.isolation import run_isolation
    from llmaas.check.soak import run_soak

    return {"crash": lambda: CrashCampaign(plan.crash_rounds, seed).run(),
            "disk": lambda: DiskCampaign(seed).run(),
            "concurrency": lambda: run_concurrency(plan.concurrency_s, seed),
            "fuzz": lambda: run_fuzz(plan.schema_cases),
            "isolation": run_isolation,
            "soak": lambda: run_soak(plan.soak_apps, plan.soak_calls_per_app, plan.soak_time_limit_s)}


def passed(name: str, result: dict) -> bool:
    """The campaign's goal: nothing lost, leaked, mismatched, crashed or failed."""
    if "exception" in result:
        return False
    if name == "crash":
        return not any(result[k] for k in ("lost_turns", "lost_contexts", "mismatches", "half_saved",
                                           "phantom_turns", "uncallable"))
    if name == "disk":  # faults must really have been injected
        return not (result["lost_turns"] or result["silent_corruptions"] or result["caller_errors"]) \
            and result["faults"] > 0
    if name == "concurrency":  # and the dirty-reclaim path must really have run
        return not (result["exceptions"] or result["deadlocks"] or result["budget_violations"]) \
            and result["dirty_reclaim_waits"] > 0
    if name == "fuzz":
        return (result["server_errors"] == 0 and result["crashes"] == 0 and result["healthy_after"]
                and not result.get("control_token_injection"))
    if name == "isolation":
        return result["leaks"] == 0
    if name == "soak":
        return result["errors"] == 0
    raise ValueError(f"unknown campaign {name!r}")


def summary_line(name: str, result: dict) -> str:
    """The table's figures for one campaign."""
    if "exception" in result:
        return f"did not finish: {result['exception']}"
    if name == "crash":
        return (f"{result['rounds']} rounds, {result['kills']} kills: lost turns {result['lost_turns']}, lost "
                f"contexts {result['lost_contexts']}, mismatches {result['mismatches']}, half-saved "
                f"{result['half_saved']}, uncallable {result['uncallable']}; window slides {result['window_slides']}")
    if name == "disk":
        skipped = [k for k, v in result["phases"].items() if "skipped" in v]
        return (f"{result['faults']} faults, {result['calls']} calls: lost turns {result['lost_turns']}, silent "
                f"corruptions {result['silent_corruptions']}, caller errors {result['caller_errors']}, clear 507s "
                f"{result['storage_errors']}; turns lost with a cut WAL {result['wal_lost_turns']}"
                + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    if name == "concurrency":
        return (f"{result['calls']} calls, {result['deletes']} deletes, {result['stats_reads']} stats rounds in "
                f"{result['duration_s']:.0f} s: exceptions {result['exceptions']}, deadlocks {result['deadlocks']}, "
                f"budget violations {result['budget_violations']}; dirty reclaims waited "
                f"{result['dirty_reclaim_waits']}")
    if name == "fuzz":
        injected = ", ".join(result.get("control_token_injection", [])) or "none"
        return (f"{result['cases']} cases ({result['schema_cases']} from the OpenAPI schema): >=500 "
                f"{result['server_errors']}, crashes {result['crashes']}, healthy "
                f"after {'yes' if result['healthy_after'] else 'NO'}; control tokens parsed in text: {injected}")
    if name == "isolation":
        side = result.get("side_channel", {})
        timing = f"; B's prefill of A's text / of a control: {side['ratio']:.2f}x" if side else ""
        return f"{result['checks']} checks: leaks {result['leaks']}{timing}"
    limited = ", stopped by the time limit" if result.get("time_limited") else ""
    return (f"{result['calls']} calls ({result['apps']} apps{limited}): errors {result['errors']}, 429s "
            f"{result['throttled_429']}, p50 {_fmt_s(result['p50_s'])}, p99 {_fmt_s(result['p99_s'])}, RSS "
            f"{result['rss_growth_bytes'] / 2**20:+.1f} MiB, fds {result['fd_growth']:+d}, threads "
            f"{result['thread_growth']:+d}")


def _fmt_s(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f} s"


def run_plan(plan: Plan, only: tuple[str, ...], seed: int) -> dict:
    """Run the chosen campaigns in order; a campaign that raises is recorded as such and the others still run."""
    t0 = time.monotonic()
    out: dict = {"machine": machine(), "plan": plan.name}
    runners = campaign_runners(plan, seed)
    for name in only:
        print(f"check: campaign {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            result = runners[name]()
        except Exception as exc:  # a harness or start-up failure is a finding, reported; the next campaign runs
            result = {"exception": f"{type(exc).__name__}: {exc}"}
        result["wall_s"] = round(time.monotonic() - started, 1)
        out[name] = result
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def table(results: dict) -> str:
    names = [n for n in CAMPAIGNS if n in results]
    lines = [f"llmaas check reliability ({results['plan']}) on {results['machine']['cpu']}, "
             f"{results['machine']['cores']} cores, {results['wall_s']:.0f} s", "",
             f"{'campaign':<12} {'verdict':<7} {'wall':>6}  figures"]
    lines += [f"{n:<12} {'pass' if passed(n, results[n]) else 'FAIL':<7} {results[n]['wall_s']:>5.0f}s  "
              f"{summary_line(n, results[n])}" for n in names]
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: a campaign without samples writes null
    path.write_text(json.dumps(_nan_to_none(results), indent=2) + "\n")


def _nan_to_none(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


NOT_COVERED = (
    "a data directory that turns read-only under a running service (Linux refuses to remount a filesystem "
    "read-only while files on it are open for writing; the disk campaign covers a start on a read-only directory, "
    "and a full disk under a running service)",
    "faults outside the data directory: the model file and the kernel cache",
)


def detail_lines(results: dict) -> list[str]:
    """What the table's one line per campaign leaves out: each disk phase, the fuzz answers, the side channel."""
    lines = []
    disk = results.get("disk", {})
    for phase, figures in disk.get("phases", {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if not isinstance(v, dict))
        nested = "; ".join(f"{k}: {', '.join(f'{a} {b}' for a, b in v.items())}" for k, v in figures.items()
                           if isinstance(v, dict))
        lines.append(f"- disk, {phase.replace('_', ' ')}: {shown}" + (f"; {nested}" if nested else ""))
    fuzz = results.get("fuzz", {})
    if "statuses" in fuzz:
        schema = fuzz.get("schema", {}).get("statuses", {})
        lines.append(f"- fuzz, hand-written cases by status: {_counts(fuzz['statuses'])}; schema cases by status: "
                     f"{_counts(schema)} over {fuzz.get('schema', {}).get('operations', 0)} operations")
    side = results.get("isolation", {}).get("side_channel")
    if side:
        lines.append(f"- isolation, timing side channel ({side['pairs']} pairs): B's prefill of A's document "
                     f"{side['document_prefill_ms_per_token']} ms/token, of the control "
                     f"{side['control_prefill_ms_per_token']} ms/token (ratio {side['ratio']}); TTFT "
                     f"{side['document_ttft_s']} s vs {side['control_ttft_s']} s")
    conc = results.get("concurrency", {})
    if "calls" in conc:
        lines.append(f"- concurrency: {conc['expected_refusals']} documented refusals (404 for a context deleted "
                     f"under its call, 429), {conc['reclaimed_chunks']} chunks reclaimed, "
                     f"{conc['dirty_reclaim_waits']} of those reclaims waited for the stalled writer")
    return lines


def _counts(statuses: dict[str, int]) -> str:
    return ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))


def write_report(results: dict, path: Path, json_path: Path) -> None:
    """A short Markdown report: the table, the campaigns' details, then each failing campaign's listed failures."""
    parts = ["# Reliability check", "",
             f"`llmaas check reliability{' --quick' if results['plan'] == 'quick' else ''}` on "
             f"{results['machine']['cpu']} ({results['machine']['cores']} cores), {results['machine']['date']}; "
             f"full figures in `{json_path}`.", "", "```", table(results), "```"]
    details = detail_lines(results)
    if details:
        parts += ["", "## Details", "", *details]
    for name in (n for n in CAMPAIGNS if n in results):
        result = results[name]
        failures = result.get("failing") or result.get("notes") or result.get("error_samples") or []
        if failures or "exception" in result:
            parts += ["", f"## {name}: findings", ""]
            parts += [f"- {result['exception']}"] if "exception" in result else []
            parts += [f"- `{f}`" for f in failures[:30]]
    parts += ["", "## Not covered by these campaigns yet", "", *(f"- {gap}" for gap in NOT_COVERED)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
