"""llama.cpp's own per-sequence state save/restore of an N-token context, cold from disk: the peer that
`llmaas bench restore --peer llama-cpp` compares our restore with.

Owns the protocol: prefill the caller's ids, save seq 0's state with the raw llama_state_seq_* API (get + write +
fsync), then per load clear the sequence, drop the file from the page cache and time read + set; check the
restored context's next-token logits against a never-cleared run. Runs in its own process
(`python -m llmaas.bench.restore_peer`, one JSON line per command on stdin) so llama.cpp's threads and memory stay
out of the caller's, and so the caller can interleave the loads with its own. Ignores which ids and which disk (the
caller's) and the disk's bandwidth (disk.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llmaas.bench.disk import drop_from_page_cache, read_into

STATE_FILE = "llama_cpp_seq0.state"


def _progress(msg: str) -> None:
    print(f"    llama.cpp restore: {msg}", file=sys.stderr, flush=True)


def _last_logits(llm) -> np.ndarray:
    # logits_all=False: only the last token's logits, in the context's own buffer (PEERS.md); copy, it is reused
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def _save(ctx, buf, path: Path) -> tuple[float, float]:
    """Seconds for (get the state into buf, write buf to path + fsync), then drop path from the page cache."""
    import llama_cpp

    t0 = time.perf_counter()
    n = llama_cpp.llama_state_seq_get_data(ctx, buf, len(buf), 0)
    t1 = time.perf_counter()
    if n != len(buf):
        raise RuntimeError(f"llama_state_seq_get_data wrote {n} bytes, expected {len(buf)}")
    with open(path, "wb", buffering=0) as f:
        f.write(memoryview(buf).cast("B"))
        os.fsync(f.fileno())
    t2 = time.perf_counter()
    drop_from_page_cache(path)
    return t1 - t0, t2 - t1


def _load(ctx, memory, buf, path: Path) -> tuple[float, float]:
    """Clear seq 0, then seconds for (read path into buf, set seq 0's state from buf). path must be cold."""
    import llama_cpp

    llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)  # the whole sequence: never fails
    ctypes.memset(buf, 0, len(buf))  # untimed; so the restored state can only have come from the file
    t0 = time.perf_counter()
    n = read_into(path, buf)
    t1 = time.perf_counter()
    ok = llama_cpp.llama_state_seq_set_data(ctx, buf, len(buf), 0)
    t2 = time.perf_counter()
    if n != len(buf) or ok == 0:
        raise RuntimeError(f"restore failed: read {n} of {len(buf)} bytes, llama_state_seq_set_data returned {ok}")
    return t1 - t0, t2 - t1


class _Worker:
    """The worker's side: llama.cpp, the context prefilled and saved, then one cold load per command."""

    def __init__(self, model_path: Path, ids: list[int], directory: Path, threads: int, saves: int) -> None:
        import llama_cpp

        from llmaas.bench.engine_adapters import LlamaCppAdapter

        self.ids, self.threads = ids, threads
        self.llm = LlamaCppAdapter(model_path, threads, n_ctx=len(ids) + 1).llm
        self.ctx, self.memory = self.llm._ctx.ctx, llama_cpp.llama_get_memory(self.llm._ctx.ctx)
        t0 = time.perf_counter()
        self.llm.eval(ids)
        _progress(f"prefilled {len(ids)} tokens in {time.perf_counter() - t0:.1f} s")
        self.next_id = int(_last_logits(self.llm).argmax())
        self.nbytes = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        self.buf = (ctypes.c_uint8 * self.nbytes)()  # preallocated once, for every save and load
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / STATE_FILE
        self.saves = [_save(self.ctx, self.buf, self.path) for _ in range(saves)]
        _progress(f"saved {self.nbytes / 1e6:.1f} MB: "
                  f"{1e3 * statistics.median(g + w for g, w in self.saves):.1f} ms median")
        self.llm.eval([self.next_id])
        self.reference = _last_logits(self.llm)  # the never-cleared context's next-token logits
        self.loads: list[tuple[float, float]] = []
        self.matches: list[bool] = []
        self.max_diff = 0.0

    def load(self) -> dict:
        """One cold load of the saved state, checked against the never-cleared context."""
        self.llm.n_tokens = 0
        drop_from_page_cache(self.path)
        read_s, set_s = _load(self.ctx, self.memory, self.buf, self.path)
        # the raw API restores the KV only: tell the Python wrapper what the context holds (PEERS.md)
        n = len(self.ids)
        self.llm.n_tokens = n
        self.llm.input_ids[:n] = self.ids
        self.llm.eval([self.next_id])
        logits = _last_logits(self.llm)
        match, diff = bool(np.array_equal(logits, self.reference)), float(np.abs(logits - self.reference).max())
        self.loads.append((read_s, set_s))
        self.matches.append(match)
        self.max_diff = max(self.max_diff, diff)
        return {"load_s": read_s + set_s, "read_s": read_s, "set_s": set_s, "logits_match": match}

    def summary(self) -> dict:
        from llmaas.bench.engine_worker import peak_rss_mb

        loads, saves = self.loads, self.saves
        return {
            "load_s": statistics.median(r + s for r, s in loads),
            "save_s": statistics.median(g + w for g, w in saves),
            "bytes": self.nbytes,
            "load_s_all": [r + s for r, s in loads],
            "save_s_all": [g + w for g, w in saves],
            "read_s": statistics.median(r for r, _ in loads),
            "set_s": statistics.median(s for _, s in loads),
            "get_s": statistics.median(g for g, _ in saves),
            "write_s": statistics.median(w for _, w in saves),
            "logits_match": all(self.matches),
            "logits_max_abs_diff": self.max_diff,
            "tokens": len(self.ids),
            "threads": self.threads,
            "repeats": len(loads),
            "peak_rss_mb": peak_rss_mb(),
        }


class PeerRestore:
    """llama.cpp's side of a restore benchmark, in a worker process that stays up (its progress lines go to our
    stderr): started, it prefills the context that ids make and saves its state under directory; then each load()
    is one cold load, when the caller chooses, so a benchmark can interleave the peer's loads with its own restores
    and a drifting disk (a VM's, here) weighs on both alike. finish() returns the medians (see
    measure_restore_peer) and stops the worker; the state file is removed."""

    def __init__(self, ids: list[int], directory: Path, *, model_path: Path | None = None, threads: int = 2,
                 saves: int = 5) -> None:
        from llmaas.paths import default_model_path

        model = model_path if model_path is not None else default_model_path()
        self._directory = directory
        self._tmp = tempfile.TemporaryDirectory()
        ids_file = Path(self._tmp.name) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        cmd = [sys.executable, "-m", "llmaas.bench.restore_peer", "--model", str(model), "--ids", str(ids_file),
               "--dir", str(directory), "--threads", str(threads), "--saves", str(saves)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask(None)  # "ready", once the context is prefilled and saved

    def _ask(self, command: str | None) -> dict:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        if command is not None:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the llama.cpp restore worker failed (exit {code}); see its messages above")
        return json.loads(line)

    def load(self) -> dict:
        """One cold load: {load_s, read_s, set_s, logits_match}."""
        return self._ask("load")

    def finish(self) -> dict:
        try:
            return self._ask("done")
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker (it removes its state file as it ends; so does this, should it have been killed)."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()  # the worker's command loop ends
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        (self._directory / STATE_FILE).unlink(missing_ok=True)
        self._tmp.cleanup()


def measure_restore_peer(ids: list[int], directory: Path, *, model_path: Path | None = None, threads: int = 2,
                         repeats: int = 5) -> dict:
    """llama.cpp's cold save/restore of the context that ids make, with its state file under directory, measured
    in a worker process. Returns medians over repeats:
    load_s (read + set), save_s (get + write + fsync), bytes (the state), load_s_all, save_s_all, read_s, set_s,
    get_s, write_s, logits_match (restored next-token logits bit-identical to a never-cleared run),
    logits_max_abs_diff, tokens, threads, repeats, peak_rss_mb (the worker's)."""
    peer = PeerRestore(ids, directory, model_path=model_path, threads=threads, saves=repeats)
    try:
        for _ in range(repeats):
            peer.load()
        return peer.finish()
    finally:
        peer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmaas.bench.restore_peer", description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True, help="JSON list of the context's token ids")
    p.add_argument("--dir", type=Path, required=True, help="directory for the state file (on the disk to measure)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--saves", type=int, default=5, help="timed saves before the loads")
    args = p.parse_args(argv)
    worker = _Worker(args.model, json.loads(args.ids.read_text()), args.dir, args.threads, args.saves)
    try:
        print(json.dumps({"ready": True}), flush=True)
        for command in sys.stdin:  # one JSON line answers each command: "load", then "done"
            if command.strip() == "load":
                print(json.dumps(worker.load()), flush=True)
            elif command.strip() == "done":
                print(json.dumps(worker.summary()), flush=True)
                break
    finally:
        worker.path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
