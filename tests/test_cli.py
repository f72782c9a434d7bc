"""The command line as a user runs it: info, generate, help and --version, errors that say what to fix (exit code
2), chat's commands driven through its functions, the demo's clean-up, and where benchmarks write."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from llmaas import cli
from llmaas.bench.plotting import pyplot
from llmaas.bench.switch import build_parser as switch_parser
from llmaas.bench.switch import output_paths
from llmaas.cli import chat, demo
from llmaas.cli.bench import BENCHMARKS
from llmaas.cli.eval import EVALUATIONS
from llmaas.paths import DataDir

ROOT = Path(__file__).resolve().parents[1]


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
    assert info["model"]["id"] == "SmolLM2-135M-Instruct.Q4_1"  # the API's model id (GET /v1/models), not general.name


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

    from llmaas.paths import DataDir
    from llmaas.service.process import start_service

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
    assert f"llmaas chat --home {tmp_path / 'demo'}" in out.stdout  # how to go on, on the demo's (kept) data


# -- help and --version --------------------------------------------------------------------------------------------

HELP_PAGES = [(name,) for name in cli.COMMANDS] + [("bench", name) for name in BENCHMARKS] + [
    ("eval", name) for name in EVALUATIONS] + [("bench", "trace", "make"), ("elastic", "build"), ("elastic", "train"),
                                               ("elastic", "profile"), ("elastic", "score-head"),
                                               ("check", "reliability")]


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    try:
        code = cli.main([*argv, "--help"])
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    out = capsys.readouterr()
    assert code == 0, (argv, out.err)
    return out.out


def test_every_help_page_exits_0_and_stands_alone(capsys):
    for argv in [(), ("bench",), ("eval",), *HELP_PAGES]:
        text = help_text(capsys, *argv)
        assert text.strip(), argv
        for reference in ("spec §", "the issue", "issue's", "see the comment"):  # what a user does not have
            assert reference not in text, (argv, reference)


def test_dispatcher_help_lists_every_command_with_a_summary(capsys):
    top = help_text(capsys)
    assert all(f"  {name} " in top for name in cli.COMMANDS) and "--version" in top
    assert "bench engine|service|restore|trace|switch" in top
    for prog, table in (("bench", BENCHMARKS), ("eval", EVALUATIONS)):
        listing = help_text(capsys, prog)
        for name, (_, summary) in table.items():
            assert f"  {name} " in listing and summary in listing, (prog, name)
        assert "LLMAAS_EXTRAS=bench" in listing  # how to get the plots


def test_version():
    out = llmaas("--version")
    assert out.returncode == 0 and out.stdout == f"llmaas {importlib.metadata.version('llmaas')}\n"


# -- chat --------------------------------------------------------------------------------------------------------

class FakeClient:
    """What chat's commands call on the service, recorded."""

    def __init__(self, stream: list[str | BaseException] | None = None) -> None:
        self.deleted: list[str] = []
        self.contexts = 0
        self.pieces = stream or []
        self.stream_closed = False

    def new_context(self, system: str | None) -> str:
        self.contexts += 1
        return f"ctx-{self.contexts}"

    def delete(self, context_id: str) -> None:
        self.deleted.append(context_id)

    def stream(self, context_id: str, prompt: str, **generation):
        try:
            for piece in self.pieces:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:  # runs when the generator is closed or raises: the HTTP stream would close here
            self.stream_closed = True


def answers(monkeypatch: pytest.MonkeyPatch, *lines: str | type[BaseException]) -> list:
    """Make input() return these lines in turn (an exception class is raised instead, as Ctrl-C or Ctrl-D would);
    returns the lines not read yet."""
    queue = list(lines)

    def fake_input(prompt: str = "") -> str:
        item = queue.pop(0)
        if isinstance(item, type):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    return queue


def test_plural():
    assert [cli.plural(n, "call") for n in (0, 1, 2)] == ["0 calls", "1 call", "2 calls"]


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("", False), (EOFError, False),
                                                 (KeyboardInterrupt, False), ("y", True), ("YES", True)])
def test_chat_delete_asks_first(monkeypatch, capsys, answer, deleted):
    answers(monkeypatch, answer)
    client = FakeClient()
    ctx = chat._command(client, "ctx-0", "/delete", argparse.Namespace(system=None))
    assert client.deleted == (["ctx-0"] if deleted else [])
    assert ctx == ("ctx-1" if deleted else "ctx-0")  # a deleted context is replaced by a new one
    assert ("not deleted" in capsys.readouterr().out) != deleted


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_chat(monkeypatch, capsys):
    client = FakeClient(stream=["Once upon", " a time", KeyboardInterrupt()])
    unread = answers(monkeypatch, "tell me a story", "/exit")
    chat.converse(client, "ctx-0", argparse.Namespace(max_tokens=8, temperature=0.0, system=None))
    out = capsys.readouterr().out
    assert "Once upon a time" in out and "[stopped" in out
    assert client.stream_closed  # the stream is closed, so the service cancels the call
    assert unread == []  # the chat went on to read /exit after the stop


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt])
def test_chat_leaves_on_ctrl_d_or_ctrl_c_at_the_prompt(monkeypatch, key):
    answers(monkeypatch, key)
    chat.converse(FakeClient(), "ctx-0", argparse.Namespace())  # returns instead of raising


# -- demo --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("keep", "left"), [(False, False), (True, True)])
def test_demo_removes_its_temporary_directory_even_on_ctrl_c(monkeypatch, tmp_path, keep, left):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyboardInterrupt), demo.demo_home(None, keep) as home:
        assert home.root.parent == tmp_path and home.root.name.startswith("llmaas-demo-")
        home.catalog.write_text("")
        raise KeyboardInterrupt
    assert home.root.exists() == left


def test_demo_never_removes_a_named_home(tmp_path):
    with demo.demo_home(str(tmp_path / "mine"), keep=False) as home:
        pass
    assert home.root.is_dir()


def test_demo_says_how_to_go_on(tmp_path):
    home = DataDir(tmp_path)
    fresh, kept = demo.next_steps(home, kept=False), demo.next_steps(home, kept=True)
    assert all(step in fresh for step in ("llmaas apps add NAME", "llmaas serve", "llmaas chat"))
    assert str(tmp_path) not in fresh  # the default data directory: the demo's is gone
    at = f"--home {tmp_path}"
    assert all(step in kept for step in (f"llmaas apps {at} add NAME", f"llmaas serve {at}", f"llmaas chat {at}"))


# -- outputs -------------------------------------------------------------------------------------------------------

def test_bench_switch_writes_outside_docs_unless_asked():
    for argv in ([], ["--quick"]):
        args = switch_parser().parse_args(argv)
        assert all(path.parts[0] == "out" for path in output_paths(args.out, args.quick)), argv
    # `--out docs` writes exactly the files the repository keeps (the full run); a quick run goes beside, never over
    assert all((ROOT / path).exists() for path in output_paths(Path("docs"), False))
    assert set(output_paths(Path("docs"), True)).isdisjoint(output_paths(Path("docs"), False))


def test_missing_matplotlib_is_said_once_with_the_way_to_add_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed, even where it is
    pyplot.cache_clear()
    try:
        assert pyplot() is None and pyplot() is None
    finally:
        pyplot.cache_clear()
    err = capsys.readouterr().err
    assert err.count("no plots") == 1 and "LLMAAS_EXTRAS=bench" in err
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["bench"])
    assert "LLMAAS_EXTRAS" in (ROOT / "scripts" / "setup.sh").read_text()
