"""`llmaas check reliability`: crash, concurrency, fuzz, isolation and soak campaigns against real `llmaas serve`
processes.

Each campaign starts its own service on a temporary data directory (nothing under $LLMAAS_HOME is touched), prints
progress with an ETA, and the command ends with a table; the JSON goes to --json, a Markdown report only to --report.
Exit code 1 when a campaign fails its goal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmaas.check.runner import CAMPAIGNS, FULL, QUICK, passed, run_plan, table, write_json, write_report


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas check", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reliability", help="crash/concurrency/fuzz/isolation/soak campaigns on live services",
                       description=__doc__)
    r.add_argument("--quick", action="store_true",
                   help=f"the short plan: {QUICK.crash_rounds} crash rounds, {QUICK.concurrency_s:.0f} s of "
                        f"concurrency, soak {QUICK.soak_apps} apps x {QUICK.soak_calls_per_app} calls (a few minutes "
                        "on 2 cores)")
    r.add_argument("--json", type=Path, required=True, help="where to write the results")
    r.add_argument("--report", type=Path, help="also write a Markdown report here (e.g. docs/RELIABILITY.md)")
    r.add_argument("--only", action="append", choices=CAMPAIGNS,
                   help="run only this campaign (repeatable; default: all)")
    r.add_argument("--crash-rounds", type=int, help="override the plan's number of crash rounds")
    r.add_argument("--seed", type=int, default=0, help="seed of the kill moments and replays (default: 0)")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.crash_rounds is not None:
        if args.crash_rounds < 1:
            p.error("--crash-rounds must be >= 1")
        plan = type(plan)(**{**plan.__dict__, "crash_rounds": args.crash_rounds})
    only = tuple(n for n in CAMPAIGNS if args.only is None or n in args.only)
    results = run_plan(plan, only, args.seed)
    write_json(results, args.json)
    print(table(results))
    print(f"\nwrote {args.json}" + (f" and {args.report}" if args.report else ""), file=sys.stderr)
    if args.report is not None:
        write_report(results, args.report, args.json)
    return 0 if all(passed(n, results[n]) for n in only) else 1
