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


def test_apps_add_list_remove(tmp_path):
    home = ["--home", str(tmp_path)]
    added = llmaas("apps", *home, "add", "mail", "--max-contexts", "3")
    assert added.returncode == 0 and "llmaas-" in added.stdout
    listed = llmaas("apps", *home, "list")
    assert "mail" in listed.stdout and "3" in listed.stdout
    assert llmaas("apps", *home, "add", "mail").returncode == 2  # duplicate, said clearly
    assert llmaas("apps", *home, "remove", "mail").returncode == 0
    assert "no apps yet" in llmaas("apps", *home, "list").stdout


def test_chat_registers_itself_and_resumes_a_context(tmp_path):
    import signal

    from llmaas.cli.demo import start_service
    from llmaas.storage.paths import DataDir

    home = DataDir(tmp_path / "h").create()
    service = start_service(home, [])
    try:
        first = llmaas("chat", "--home", str(home.root), "--new", "--max-tokens", "8",
                       stdin="My name is Ada.\n/history\n/exit\n")
        assert first.returncode == 0, first.stderr
        assert "user: My name is Ada." in first.stdout and home.terminal_key.stat().st_mode & 0o777 == 0o600
        ctx = first.stdout.split("context ", 1)[1].split()[0]
        again = llmaas("chat", "--home", str(home.root), "--context", ctx, "--max-tokens", "8",
                       stdin="/history\n")
        assert "user: My name is Ada." in again.stdout  # resumed with its history
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)


def test_demo_runs_two_apps_on_a_real_service(tmp_path):
    out = llmaas("demo", "--home", str(tmp_path / "demo"), "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("-> 404 not_found_error") == 2 and "service stopped." in out.stdout
