"""`llmaas bench cold-start`: how long a fresh `llmaas serve` takes to answer its first token.

Owns the protocol: one data directory, started once untimed (a first start measures the restore profile; its time is
reported apart), then `--repeats` fresh processes on it, each sent one stateless chat completion (streamed) the
moment its socket exists; per start, the seconds from launching the process to each start-up step it prints
(listening, model loaded, ready) and to the first streamed token. Medians reported, JSON written.
Ignores the page cache: the model file and the libraries are as warm as the previous start left them (a device
that has just booted would add their cold reads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from llmaas.bench.results import machine, write_json
from llmaas.paths import DataDir
from llmaas.service.process import stop_service
from llmaas.storage.catalog import Catalog

# The service's progress lines (server.py) that mark each start-up step, in order.
STEPS = {"listening": "listening on", "loaded": "starting the engine", "ready": "ready:"}
PROMPT = "Say hello."
TIMEOUT_S = 300.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas bench cold-start", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="fresh processes timed, median reported (default: 5)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("llmaas bench cold-start: --repeats must be >= 1")
    home = DataDir(Path(tempfile.mkdtemp(prefix="llmaas-cold-start-"))).create()
    try:
        catalog = Catalog(home.catalog)
        try:
            key = catalog.add_app("cold-start")[1]
        finally:
            catalog.close()
        _progress("first start on a new data directory (measures the restore profile; timed apart)")
        first = start_and_ask(home, key, None)
        runs = []
        for i in range(args.repeats):
            runs.append(start_and_ask(home, key, first["model"]))
            _progress(f"start {i + 1}/{args.repeats}: first token after {runs[-1]['first_token_s']:.2f} s")
    finally:
        shutil.rmtree(home.root, ignore_errors=True)
    result = {"config": {"repeats": args.repeats, "prompt": PROMPT}, "machine": machine(), "first_start": first,
              "runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}}
    print_table(result)
    if args.json:
        write_json(result, args.json)
    return 0


def start_and_ask(home: DataDir, key: str, model: str | None) -> dict:
    """Launch `llmaas serve` on home, ask `model` (None: ask the service which, first) for one token as soon as its
    socket exists, stop it; seconds from launch to each start-up step and to the first token."""
    home.socket.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmaas", "serve", "--home", str(home.root)],
                            stderr=subprocess.PIPE, text=True)
    marks: dict[str, float] = {}
    reader = threading.Thread(target=_mark_steps, args=(proc, t0, marks), daemon=True)
    reader.start()
    try:
        while not home.socket.exists():  # it binds before it loads: from here a request waits in the backlog
            if proc.poll() is not None or time.perf_counter() - t0 > TIMEOUT_S:
                raise SystemExit(f"llmaas bench cold-start: the service did not start; see {home.log_dir}")
            time.sleep(0.002)
        transport = httpx.HTTPTransport(uds=str(home.socket))
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(transport=transport, base_url="http://llmaas", timeout=TIMEOUT_S, headers=auth) as client:
            if model is None:
                model = str(client.get("/v1/models").raise_for_status().json()["data"][0]["id"])
            body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2,
                    "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                reply.raise_for_status()
                first_token_s = next(time.perf_counter() - t0 for line in reply.iter_lines() if _has_text(line))
    finally:
        stop_service(proc)
        reader.join(timeout=10)
    missing = [step for step in STEPS if step not in marks]
    if missing:
        raise SystemExit(f"llmaas bench cold-start: the service never printed {missing}; see {home.log_dir}")
    return {**{f"{step}_s": marks[step] for step in STEPS}, "first_token_s": first_token_s, "model": model}


def _has_text(line: str) -> bool:
    """An SSE line carrying generated text (not the role-only first chunk, not [DONE])."""
    if not line.startswith("data: {"):
        return False
    return any(choice.get("delta", {}).get("content") for choice in json.loads(line[6:]).get("choices", []))


def _mark_steps(proc: subprocess.Popen, t0: float, marks: dict[str, float]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        for step, text in STEPS.items():
            if text in line and step not in marks:
                marks[step] = time.perf_counter() - t0


def print_table(result: dict) -> None:
    m = result["median"]
    print(f"\ncold start of `llmaas serve`, median of {result['config']['repeats']} fresh processes (seconds from "
          "launch; page cache warm)")
    for name, key in (("listening", "listening_s"), ("model loaded", "loaded_s"), ("ready", "ready_s"),
                      ("first token", "first_token_s")):
        print(f"  {name:<14}{m[key]:>8.2f}")
    print(f"first start on a new data directory (with the restore profile): first token after "
          f"{result['first_start']['first_token_s']:.2f} s")


def _progress(line: str) -> None:
    print(f"bench cold-start: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
