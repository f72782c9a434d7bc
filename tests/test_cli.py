"""The command line as a user runs it: info, generate, and errors that say what to fix (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys


def llmaas(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmaas", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_info_json_describes_the_bundled_model():
    out = llmaas("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["config"]["n_layers"] == 30 and info["config"]["n_kv_heads"] == 3
    assert info["kv_bytes_per_token"]["fp16"] == 23040  # 2 x 30 layers x 3 heads x 64 dims x 2 bytes
    assert abs(info["params"]["total"] - 134.5e6) < 0.1e6


def test_generate_streams_a_reply_and_reports_timings():
    out = llmaas("generate", "-", "--max-tokens", "8", stdin="Name a colour.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "tok/s" in out.stderr and "TTFT" in out.stderr


def test_errors_name_the_cause():
    missing = llmaas("generate", "hi", "--model", "/no/such/model.gguf")
    assert missing.returncode == 2 and "model file not found" in missing.stderr
    bad = llmaas("generate", "hi", "--temperature", "-1")
    assert bad.returncode == 2 and "temperature" in bad.stderr
    unknown = llmaas("frobnicate")
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr
