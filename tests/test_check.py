"""The reliability check's pure pieces: the crash history checker, percentiles, the fuzz cases, verdicts and tables.

No service is started here: `llmaas check reliability --quick` is the end-to-end run.
"""

from __future__ import annotations

import json
import math

import pytest

from llmaas.check.crash import plan_prompts
from llmaas.check.fuzz import LIMIT_BYTES, make_cases, request
from llmaas.check.harness import percentile
from llmaas.check.history import check_history
from llmaas.check.runner import QUICK, detail_lines, passed, summary_line, table, write_json
from llmaas.check.soak import summarize

PROMPTS = ["p0", "p1", "p2", "p3"]
TWIN = ["r0", "r1", "r2", "r3"]


def turns(n: int, replies: list[str] = TWIN) -> list[dict]:
    out: list[dict] = []
    for i in range(n):
        out += [{"role": "user", "content": PROMPTS[i]}, {"role": "assistant", "content": replies[i]}]
    return out


def test_history_all_acknowledged_turns_present():
    v = check_history(turns(2), 2, PROMPTS, TWIN, acked=2, in_flight=False)
    assert v.is_consistent and v.stored_turns == 2


def test_history_in_flight_turn_may_or_may_not_be_there():
    assert check_history(turns(3), 3, PROMPTS, TWIN, acked=2, in_flight=True).is_consistent
    assert check_history(turns(2), 2, PROMPTS, TWIN, acked=2, in_flight=True).is_consistent
    phantom = check_history(turns(3), 3, PROMPTS, TWIN, acked=2, in_flight=False)
    assert phantom.phantom and not phantom.is_consistent


def test_history_lost_turns_counted():
    v = check_history(turns(1), 1, PROMPTS, TWIN, acked=3, in_flight=False)
    assert v.lost_turns == 2 and not v.is_consistent


def test_history_half_saved_turn_detected():
    msgs = turns(2)[:-1]  # a user message without its reply
    assert check_history(msgs, 1, PROMPTS, TWIN, acked=1, in_flight=True).half_saved
    assert check_history(turns(2), 3, PROMPTS, TWIN, acked=2, in_flight=False).half_saved  # num_calls disagrees
    swapped = [turns(1)[1], turns(1)[0]]
    assert check_history(swapped, 1, PROMPTS, TWIN, acked=1, in_flight=False).half_saved


def test_history_wrong_prompt_and_mismatch():
    wrong = turns(2)
    wrong[2]["content"] = "never sent"
    assert check_history(wrong, 2, PROMPTS, TWIN, acked=2, in_flight=False).phantom
    v = check_history(turns(3, ["r0", "other", "r2"]), 3, PROMPTS, TWIN, acked=3, in_flight=False)
    assert v.first_mismatch == 1
    # replies beyond what the twin knows are not judged
    assert check_history(turns(3), 3, PROMPTS, TWIN[:1], acked=3, in_flight=False).is_consistent


def test_history_ignores_a_system_message():
    msgs = [{"role": "system", "content": "be brief"}, *turns(1)]
    assert check_history(msgs, 1, PROMPTS, TWIN, acked=1, in_flight=False).is_consistent


def test_percentile_and_summary():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))
    assert summarize([1.0, 2.0, 3.0]) == {"p50_s": 2.0, "p99_s": pytest.approx(2.98)}


def test_fuzz_cases_unique_and_well_formed():
    cases = make_cases("key", "ctx-abc")
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) and len(cases) > 200
    assert any(len(c.raw) > LIMIT_BYTES for c in cases)  # over the body limit
    assert any(b"NaN" in c.raw for c in cases) and any(b"\xff" in c.raw for c in cases)
    assert any(n.startswith("chat/") for n in names) and any(n.startswith("call/") for n in names)


def test_request_bytes():
    raw = request("POST", "/x", "k", b"{}", content_length=9)
    assert raw.startswith(b"POST /x HTTP/1.1\r\n") and b"Authorization: Bearer k\r\n" in raw
    assert b"Content-Length: 9\r\n" in raw and raw.endswith(b"\r\n\r\n{}")
    assert b"Content-Type" not in request("GET", "/health", None)


def test_plan_prompts_deterministic():
    assert plan_prompts(3, 5) == plan_prompts(3, 5) and len(set(plan_prompts(3, 5))) == 5


def test_verdicts_table_and_json(tmp_path):
    results = {"machine": {"cpu": "Test CPU", "cores": 2, "date": "x"}, "plan": QUICK.name, "wall_s": 1.0,
               "isolation": {"checks": 3, "leaks": 0, "failing": [], "wall_s": 1.0},
               "soak": {"apps": 1, "calls": 0, "errors": 0, "throttled_429": 0, "p50_s": math.nan,
                        "p99_s": math.nan, "rss_growth_bytes": 0, "fd_growth": 0, "thread_growth": 0,
                        "wall_s": 1.0},
               "fuzz": {"exception": "ServiceStartError: boom", "wall_s": 0.0}}
    assert passed("isolation", results["isolation"]) and not passed("fuzz", results["fuzz"])
    text = table(results)
    assert "Test CPU" in text and "crash" not in text and "did not finish" in text
    write_json(results, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["soak"]["p50_s"] is None  # NaN is not JSON


def test_the_concurrency_verdict_needs_the_dirty_reclaim_path_to_have_run():
    clean = {"calls": 9, "deletes": 3, "stats_reads": 20, "duration_s": 60.0, "exceptions": 0, "deadlocks": 0,
             "budget_violations": 0, "dirty_reclaim_waits": 4}
    assert passed("concurrency", clean) and "dirty reclaims waited 4" in summary_line("concurrency", clean)
    assert not passed("concurrency", {**clean, "dirty_reclaim_waits": 0})  # the load never reached the path
    assert not passed("concurrency", {**clean, "deadlocks": 1})


def test_the_report_details_each_disk_phase_and_the_side_channel():
    results = {"disk": {"phases": {"full_disk_and_read_only": {"faults": 2, "read_only": {"skipped": "no root"}}}},
               "isolation": {"side_channel": {"pairs": 5, "ratio": 0.98, "document_prefill_ms_per_token": 1.9,
                                              "control_prefill_ms_per_token": 1.9, "document_ttft_s": 0.5,
                                              "control_ttft_s": 0.5}}}
    lines = detail_lines(results)
    assert lines[0] == "- disk, full disk and read only: faults 2; read_only: skipped no root"
    assert "ratio 0.98" in lines[1]
