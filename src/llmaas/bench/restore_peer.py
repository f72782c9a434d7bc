"""llama.cpp's own per-sequence state save/restore of an N-token context, cold from disk: the peer that
`llmaas bench restore --peer llama-cpp` compares our restore with.

Owns the protocol: prefill the caller's ids, save seq 0's state with the raw llama_state_seq_* API (get + write +
fsync), then per repeat clear the sequence, drop the file from the page cache and time read + set; check the
restored context's next-token logits against a never-cleared run. Runs in its own process
(`python -m llmaas.bench.restore_peer`) so llama.cpp's threads and memory stay out of the caller's. Ignores which
ids and which disk (the caller's) and the disk's bandwidth (disk.py).
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


def measure_in_process(model_path: Path, ids: list[int], directory: Path, *, threads: int = 2,
                       repeats: int = 5) -> dict:
    """The protocol in this process (the worker's body); see measure_restore_peer for the result's keys."""
    import llama_cpp

    from llmaas.bench.engine_adapters import LlamaCppAdapter
    from llmaas.bench.engine_worker import peak_rss_mb

    n_tokens = len(ids)
    llm = LlamaCppAdapter(model_path, threads, n_ctx=n_tokens + 1).llm
    ctx, memory = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)
    t0 = time.perf_counter()
    llm.eval(ids)
    _progress(f"prefilled {n_tokens} tokens in {time.perf_counter() - t0:.1f} s")
    next_id = int(_last_logits(llm).argmax())

    nbytes = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * nbytes)()  # preallocated once, for every save and load (its pages faulted in by get)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    try:
        saves = [_save(ctx, buf, path) for _ in range(repeats)]
        _progress(f"saved {nbytes / 1e6:.1f} MB: {1e3 * statistics.median(g + w for g, w in saves):.1f} ms median")
        llm.eval([next_id])
        reference = _last_logits(llm)  # the never-cleared context's next-token logits

        loads, matches, max_diff = [], [], 0.0
        for _ in range(repeats):
            llm.n_tokens = 0
            drop_from_page_cache(path)
            loads.append(_load(ctx, memory, buf, path))
            # the raw API restores the KV only: tell the Python wrapper what the context holds (PEERS.md)
            llm.n_tokens = n_tokens
            llm.input_ids[:n_tokens] = ids
            llm.eval([next_id])
            logits = _last_logits(llm)
            matches.append(bool(np.array_equal(logits, reference)))
            max_diff = max(max_diff, float(np.abs(logits - reference).max()))
        _progress(f"loaded cold: {1e3 * statistics.median(r + s for r, s in loads):.1f} ms median, "
                  f"logits match: {all(matches)}")
    finally:
        path.unlink(missing_ok=True)
    return {
        "load_s": statistics.median(r + s for r, s in loads),
        "save_s": statistics.median(g + w for g, w in saves),
        "bytes": nbytes,
        "load_s_all": [r + s for r, s in loads],
        "save_s_all": [g + w for g, w in saves],
        "read_s": statistics.median(r for r, _ in loads),
        "set_s": statistics.median(s for _, s in loads),
        "get_s": statistics.median(g for g, _ in saves),
        "write_s": statistics.median(w for _, w in saves),
        "logits_match": all(matches),
        "logits_max_abs_diff": max_diff,
        "tokens": n_tokens,
        "threads": threads,
        "repeats": repeats,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_restore_peer(ids: list[int], directory: Path, *, model_path: Path | None = None, threads: int = 2,
                         repeats: int = 5) -> dict:
    """llama.cpp's cold save/restore of the context that ids make, with its state file under directory, measured
    in a worker process (its progress lines go to our stderr). Returns medians over repeats:
    load_s (read + set), save_s (get + write + fsync), bytes (the state), load_s_all, save_s_all, read_s, set_s,
    get_s, write_s, logits_match (restored next-token logits bit-identical to a never-cleared run),
    logits_max_abs_diff, tokens, threads, repeats, peak_rss_mb (the worker's)."""
    from llmaas.paths import default_model_path

    model = model_path if model_path is not None else default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        cmd = [sys.executable, "-m", "llmaas.bench.restore_peer", "--model", str(model), "--ids", str(ids_file),
               "--dir", str(directory), "--threads", str(threads), "--repeats", str(repeats)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the llama.cpp restore worker failed (exit {out.returncode}); see its messages above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmaas.bench.restore_peer", description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True, help="JSON list of the context's token ids")
    p.add_argument("--dir", type=Path, required=True, help="directory for the state file (on the disk to measure)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    ids = json.loads(args.ids.read_text())
    json.dump(measure_in_process(args.model, ids, args.dir, threads=args.threads, repeats=args.repeats), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
