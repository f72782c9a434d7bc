"""Contexts survive kill -9: a real `llmaas serve` process is killed after a call and in the middle of one, restarted,
and the context continues with the same greedy reply as an uninterrupted twin. One service per data directory."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

from llmaas.client import Client
from llmaas.paths import DataDir
from llmaas.service.process import start_service
from llmaas.storage.catalog import Catalog

SYSTEM = "You are a helpful assistant. Answer briefly."
TURNS = ["My favourite colour is green and my cat is called Miso.", "What is my cat called, and what colour do I like?"]
GEN = {"max_tokens": 24, "temperature": 0}


@contextmanager
def serving(home: DataDir):
    """A `llmaas serve` process on home, stopped at the end unless a test killed it. Its KV is lossless, so a context
    restored after a restart must continue exactly like one that never left memory (with the default INT8/INT4 KV a
    reply may differ after a few tokens, legitimately)."""
    proc = start_service(home, ["--kv-policy", "llms-lossless"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def fresh_home(tmp_path, name: str) -> tuple[DataDir, str]:
    home = DataDir(tmp_path / name).create()
    catalog = Catalog(home.catalog)
    key = catalog.add_app("persist")[1]
    catalog.close()
    return home, key


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> list[str]:
    """The replies of an uninterrupted service to the same two turns."""
    home, key = fresh_home(tmp_path_factory.mktemp("twin"), "h")
    with serving(home):
        c = Client(key, socket=home.socket)
        ctx = c.new_context(SYSTEM)
        return [c.call(ctx, turn, **GEN).reply for turn in TURNS]


def test_kill_after_a_call_then_restart_continues_like_the_twin(tmp_path, twin):
    home, key = fresh_home(tmp_path, "h")
    with serving(home) as proc:
        ctx = Client(key, socket=home.socket).new_context(SYSTEM)
        assert Client(key, socket=home.socket).call(ctx, TURNS[0], **GEN).reply == twin[0]
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait()
    with serving(home):  # stale socket and lock are handled
        c = Client(key, socket=home.socket)
        assert [m["content"] for m in c.get(ctx)["messages"]] == [SYSTEM, TURNS[0], twin[0]]
        got = c.get(ctx)  # the KV did not survive the process; it is rebuilt on the next call
        assert (got["state"], got["resident_bytes"]) == ("stored", 0)
        reply = c.call(ctx, TURNS[1], **GEN)
        assert reply.reply == twin[1]
        assert reply.timings["switch_s"] > 0


def test_kill_during_a_call_loses_only_that_call(tmp_path, twin):
    home, key = fresh_home(tmp_path, "h")
    with serving(home) as proc:
        c = Client(key, socket=home.socket)
        ctx = c.new_context(SYSTEM)
        c.call(ctx, TURNS[0], **GEN)
        pieces = c.stream(ctx, TURNS[1], max_tokens=400, temperature=0)
        next(pieces), next(pieces)  # the reply has started streaming
        proc.kill()
        proc.wait()
    with serving(home):
        c = Client(key, socket=home.socket)
        assert [m["content"] for m in c.get(ctx)["messages"]] == [SYSTEM, TURNS[0], twin[0]]  # nothing half-saved
        assert c.call(ctx, TURNS[1], **GEN).reply == twin[1]


def test_a_second_service_on_the_same_data_directory_fails_clearly(tmp_path):
    home, _ = fresh_home(tmp_path, "h")
    with serving(home) as proc:
        second = subprocess.run([sys.executable, "-m", "llmaas", "serve", "--home", str(home.root), "--quiet"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"another llmaas service (pid {proc.pid}) is using {home.root}" in second.stderr
