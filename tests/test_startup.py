"""Starting up: the native kernels' build key and its compile message, the restore profile's progress lines, and the
service listening before anything slow (a taken port fails at once, with nothing left behind)."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from llmaas import kernels
from llmaas.errors import KernelBuildError, ServiceStartError, StorageError
from llmaas.kv.codec import ChunkGeometry
from llmaas.kv.spec import KVSpec
from llmaas.model.loader import load_model
from llmaas.paths import DataDir
from llmaas.restore.profiler import codec_id, measure_profile
from llmaas.service import server
from llmaas.service.server import ServeOptions, Service
from tiny_gguf import write_tiny_llama


def test_kernel_build_key_follows_the_torch_installation_and_compiler(monkeypatch) -> None:
    here = kernels.build_name()
    assert kernels.build_inputs()["torch_dir"] == os.path.dirname(os.path.realpath(torch.__file__))
    assert kernels.build_name() == here  # stable
    monkeypatch.setattr(torch, "__file__", "/opt/other-env/lib/python3.11/site-packages/torch/__init__.py")
    other_env = kernels.build_name()
    assert other_env != here
    monkeypatch.setenv("CXX", "clang++")
    assert kernels.build_name() not in (here, other_env)


def test_kernels_build_with_one_ninja_whatever_the_path(monkeypatch) -> None:
    """The ninja beside this Python (the project's own) even when another comes first on PATH: two ninjas record a
    build's command differently, and each rebuilt what the other had built."""
    beside = Path(sys.executable).parent / "ninja"
    here = kernels.build_name()
    monkeypatch.setenv("PATH", "/usr/bin" + os.pathsep + os.environ.get("PATH", ""))
    if beside.exists():
        assert kernels.ninja_path() == str(beside)
        assert kernels.build_name() == here
    assert kernels.build_inputs()["ninja"] == (kernels.ninja_path() or "")


@pytest.mark.skipif(kernels.ninja_path() is None, reason="needs ninja")
def test_compiling_is_announced_also_when_a_stale_build_is_replaced(tmp_path, monkeypatch, capsys) -> None:
    """load() is faked; a stand-in build.ninja lets ninja judge whether the build is up to date."""
    monkeypatch.setenv("LLMAAS_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: "module")
    load = kernels.load_kernels.__wrapped__  # uncached

    def stderr_of_a_load() -> str:
        try:
            assert load() == "module"
        except KernelBuildError as exc:  # not x86-64 with AVX2: nothing is ever compiled here
            pytest.skip(str(exc))
        return capsys.readouterr().err

    assert "compiling native kernels" in stderr_of_a_load()  # nothing built yet
    build = tmp_path / "kernels" / kernels.build_name()
    (build / "kernels.cpp").write_text("// source")
    (build / "build.ninja").write_text("rule cp\n  command = cp $in $out\nbuild kernels.o: cp kernels.cpp\n")
    subprocess.run([kernels.ninja_path() or "ninja", "-C", str(build)], check=True, capture_output=True)
    (build / f"{kernels.build_name()}.so").touch()
    assert stderr_of_a_load() == ""  # up to date: only imported
    later = time.time() + 10
    os.utime(build / "kernels.cpp", (later, later))  # e.g. a torch header reinstalled in place
    assert "rebuilding native kernels" in stderr_of_a_load()


def test_profile_measurement_reports_each_step_with_the_time_left(tmp_path, capsys) -> None:
    loaded = load_model(write_tiny_llama(tmp_path / "tiny.gguf"), use_kernels=False)
    geometry = ChunkGeometry(KVSpec.from_config(loaded.config), 16)
    profile = measure_profile(loaded.model, geometry, "tiny", codec_id(geometry), None, 128)  # 8 chunks
    lines = capsys.readouterr().err.splitlines()
    steps = [re.fullmatch(r"llmaas profile: (\w+) .* \[(\d)/9, ~\d+ s left\]", line) for line in lines]
    assert [(m.group(1), m.group(2)) for m in steps if m] == [
        ("prefill", "1"), *[("recompute", str(i)) for i in range(2, 6)], *[("read", str(i)) for i in range(6, 10)]]
    assert [x for x, _ in profile.recompute_points] == [1, 2, 4, 8] and len(profile.io_points) == 4


def no_model_load(path=None):
    raise AssertionError("the model was loaded before the sockets were checked")


def test_a_taken_port_fails_at_once_before_the_model_loads(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(server, "load_model", no_model_load)
    home = DataDir(tmp_path / "home").create()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(ServiceStartError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*--port"):
            Service(ServeOptions(home, port=port))
        assert time.perf_counter() - t0 < 1.0
    assert not home.socket.exists()  # nothing left behind: the Unix socket is gone and the lock is free
    with open(home.lock) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_sockets_listen_before_the_model_loads(tmp_path, monkeypatch) -> None:
    """A client that connects during the load waits in the backlog instead of being refused."""
    home = DataDir(tmp_path / "home").create()
    lines: list[str] = []
    connected = []

    def load_while_checking(path=None):
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", lines[0]).group(1))
        with socket.create_connection(("127.0.0.1", port)):
            connected.append("tcp")
        with socket.socket(socket.AF_UNIX) as unix:
            unix.connect(str(home.socket))
            connected.append("unix")
        raise RuntimeError("stop here")

    monkeypatch.setattr(server, "load_model", load_while_checking)
    with pytest.raises(RuntimeError, match="stop here"):
        Service(ServeOptions(home, port=0), progress=lines.append)
    assert connected == ["tcp", "unix"]
    assert lines[0].startswith(f"listening on unix:{home.socket} and http://127.0.0.1:") and "loading" in lines[1]


def test_a_data_directory_that_takes_no_writes_is_named_with_what_to_do(tmp_path) -> None:
    """Found by the disk campaign: `serve` on a read-only data directory died in a traceback from the log handler.
    (Root ignores file modes, so the test makes the directory impossible instead: under a regular file.)"""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"does not take writes .* --home"):
        DataDir(tmp_path / "file" / "home").create()


def test_bench_cold_start_times_each_step_up_to_the_first_token(tmp_path):
    """`bench cold-start` launches real services: the steps it reads from their progress lines come in order, and
    the first token (a streamed stateless completion sent as soon as the socket exists) comes after `ready`."""
    import json

    from llmaas.bench import cold_start

    out = tmp_path / "cold.json"
    assert cold_start.main(["--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for run in (result["first_start"], *result["runs"]):
        assert 0 < run["listening_s"] <= run["loaded_s"] <= run["ready_s"] < run["first_token_s"] < 120
    assert result["median"]["first_token_s"] == result["runs"][0]["first_token_s"]
