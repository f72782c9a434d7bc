"""The schema-driven half of the fuzz campaign: schemathesis cases generated from the live service's own OpenAPI
document, valid and invalid, against every operation.

Owns the run: a service on loopback TCP (schemathesis speaks HTTP to a URL) with a 64-token context limit, so a case
that does generate stays short whatever max_tokens it asks for; an app key on every case; the path's context id
replaced by one of the app's real contexts on POSTs, so that calls are fuzzed too, not only their 404s. The target
number of cases is spread evenly over the operations; an operation with few distinct inputs (GET /health) yields
fewer, and the count reported is what really ran. Verdict as for the hand-written cases: no status >= 500, no
crash (the service is restarted and the case named), and the service still answering at the end. Needs the test
extra (schemathesis); ignores what the hand-written cases cover (raw malformed HTTP: fuzz.py).
"""

from __future__ import annotations

import socket

from llmaas.check.harness import Progress, ServiceUnderTest
from llmaas.errors import LlmaasError

FLAGS = ["--threads", "1", "--max-context-tokens", "64"]


def run_schema_fuzz(target_cases: int) -> dict:
    try:
        import schemathesis
        from hypothesis import HealthCheck, given, settings
    except ImportError as exc:
        raise LlmaasError("the schema fuzz needs schemathesis: install the test extra (pip install -e '.[test]')") \
            from exc
    port = _free_port()
    sut = ServiceUnderTest([*FLAGS, "--port", str(port)], ["schema"], prefix="llmaas-schema-")
    statuses: dict[str, int] = {}
    failing: list[str] = []
    crashes = 0
    try:
        sut.start()
        with sut.client("schema") as c:
            ctx = c.new_context()
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {sut.keys['schema']}"}
        operations = [r.ok() for r in schemathesis.openapi.from_url(f"{base}/openapi.json").get_all_operations()]
        per_operation = max(1, -(-target_cases // len(operations)))
        progress = Progress("fuzz (schema)", len(operations))
        for k, operation in enumerate(operations):

            @given(case=operation.as_strategy())
            @settings(max_examples=per_operation, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            def run(case) -> None:
                nonlocal crashes
                if case.path_parameters and "context_id" in case.path_parameters and case.method == "POST":
                    case.path_parameters["context_id"] = ctx
                what = f"{case.method} {case.formatted_path}"
                try:
                    status = case.call(base_url=base, headers=headers, timeout=120).status_code
                except Exception as exc:  # a reset or a timeout: judged below by whether the service lives
                    status, what = -1, f"{what}: {type(exc).__name__}"
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status >= 500:
                    failing.append(f"{what} ({status})")
                if not sut.is_alive():
                    crashes += 1
                    failing.append(f"{what} (service died)")
                    sut.start()

            run()
            progress.step(k + 1, f"{sum(statuses.values())} cases")
        with sut.client("schema") as c:
            healthy = bool(c.call(ctx, "Hello", max_tokens=2).reply is not None)
    finally:
        sut.close()
    return {"cases": sum(statuses.values()), "operations": len(operations), "statuses": statuses,
            "server_errors": sum(n for s, n in statuses.items() if int(s) >= 500), "crashes": crashes,
            "no_answer": statuses.get("-1", 0), "healthy_after": healthy, "failing": failing[:50]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
