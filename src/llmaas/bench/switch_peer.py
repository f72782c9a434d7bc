"""The real peer of `llmaas bench switch`: "swapping (llama.cpp)".

A trace is replayed on llama.cpp itself, using its own per-sequence state save and restore. It runs with the same
GGUF, the same token ids, the same budget and the same disk as our systems, in its own process
(`python -m llmaas.bench.switch_peer`), so llama.cpp's threads and memory stay out of ours.

The protocol is the Swapping baseline's (the LLMS paper's), built on llama.cpp's raw API:
- the active context lives in llama.cpp's KV (outside the budget, like our working KV);
- on a switch, the outgoing context's state is taken with `llama_state_seq_get_data` and held in memory;
- when the held states pass the budget, the least recently used are written to a file (fsync, dropped from the page
  cache) synchronously, within the switch;
- the incoming context is set from memory, or read cold from its file, with `llama_state_seq_set_data`.

Decoding is greedy with the same caps and stop tokens, and the same task scores are computed, so its answers can be
compared with ours. The trace's calls, resets and skips follow llmaas.bench.replay. Ignores our store entirely.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from llmaas.bench.disk import drop_from_page_cache, read_into
from llmaas.bench.kv_tasks import TASKS, score
from llmaas.bench.replay import CallRecord, ContextState, summarize
from llmaas.bench.trace import Trace


def run_in_process(model_path: Path, trace: Trace, budget_bytes: int, max_context_tokens: int, directory: Path,
                   threads: int = 2) -> dict:
    import llama_cpp

    from llmaas.bench.engine_adapters import LlamaCppAdapter
    from llmaas.engine.conversation import Conversation
    from llmaas.kv.spec import KVSpec
    from llmaas.model.loader import load_model
    from llmaas.records import Message

    loaded = load_model(model_path)  # our tokenizer and chat template: the same ids as our systems see
    conversation = Conversation(loaded.tokenizer, loaded.chat_template)
    stops = loaded.tokenizer.special.stop_ids
    llm = LlamaCppAdapter(model_path, threads, n_ctx=max_context_tokens + 8).llm
    ctx, memory = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)
    contexts: dict[str, ContextState] = {}
    held: OrderedDict[str, ctypes.Array] = OrderedDict()  # states in memory, least recently used first
    held_bytes = peak_bytes = bytes_read = bytes_written = resets = skipped = 0
    on_disk: set[str] = set()
    active: str | None = None
    covered = 0  # tokens of the active context in llama.cpp's KV
    covered_of: dict[str, int] = {}  # the same for each swapped-out context, as its state holds them
    records: list[CallRecord] = []
    directory.mkdir(parents=True, exist_ok=True)

    def file_of(kv_id: str) -> Path:
        return directory / f"{kv_id.replace('#', '_')}.state"

    def forget(kv_id: str) -> None:
        nonlocal held_bytes
        if kv_id in held:
            held_bytes -= len(held.pop(kv_id))
        file_of(kv_id).unlink(missing_ok=True)
        on_disk.discard(kv_id)

    started = time.perf_counter()
    for call in trace.calls:
        state = contexts.setdefault(call.context, ContextState(call.context))
        prompt, _, dropped = state.begin(conversation, call, max_context_tokens)
        if dropped is not None:
            forget(dropped)
            if active == dropped:
                active = None
            resets += 1
        if prompt is None:
            skipped += 1
            continue
        read_before, had_kv, hot = bytes_read, bool(state.ids), active == state.kv_id
        t0 = time.perf_counter()
        if active != state.kv_id:
            if active is not None:  # the outgoing context's state: held in memory if the budget has room for it
                buf = (ctypes.c_uint8 * llama_cpp.llama_state_seq_get_size(ctx, 0))()
                llama_cpp.llama_state_seq_get_data(ctx, buf, len(buf), 0)
                covered_of[active] = covered
                held[active] = buf
                held_bytes += len(buf)
                while held_bytes > budget_bytes:  # swap out least recently used first, synchronously
                    victim, vbuf = held.popitem(last=False)
                    with open(file_of(victim), "wb", buffering=0) as f:
                        f.write(memoryview(vbuf).cast("B"))
                        os.fsync(f.fileno())
                    drop_from_page_cache(file_of(victim))
                    held_bytes -= len(vbuf)
                    bytes_written += len(vbuf)
                    on_disk.add(victim)
                peak_bytes = max(peak_bytes, held_bytes)  # the outgoing state's buffer is transient, like a write
            llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
            covered = 0
            buf = None
            if state.kv_id in held:
                buf = held.pop(state.kv_id)
                held_bytes -= len(buf)
            elif state.kv_id in on_disk:
                path = file_of(state.kv_id)
                buf = (ctypes.c_uint8 * path.stat().st_size)()
                bytes_read += read_into(path, buf)
                forget(state.kv_id)
            if buf is not None:
                if llama_cpp.llama_state_seq_set_data(ctx, buf, len(buf), 0) == 0:
                    raise RuntimeError(f"llama_state_seq_set_data refused the state of {state.kv_id}")
                covered = covered_of[state.kv_id]
            active = state.kv_id
        # the raw API restores the KV only: tell the Python wrapper what the context holds
        llm.n_tokens = covered
        llm.input_ids[:covered] = state.ids[:covered]
        switch_s = time.perf_counter() - t0
        llm.eval([*state.ids[covered:], *prompt])  # the previous turn's uncovered tail, then the new prompt
        generated: list[int] = []
        ttft_s = 0.0
        while True:
            token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
            if not generated:
                ttft_s = time.perf_counter() - t0
            if token in stops:
                break
            generated.append(token)
            if len(generated) == call.max_new_tokens:
                break
            llm.eval([token])
        text = loaded.tokenizer.decode(generated)
        new_ids, covered = conversation.close_turn(state.history, call.user, state.ids, prompt, generated, text,
                                                   llm.n_tokens)
        state.history += [Message("user", call.user), Message("assistant", text)]
        state.ids = new_ids
        if not call.warmup:  # the trace's unmeasured warm-up
            records.append(CallRecord(call.context, call.task, had_kv, hot, switch_s, ttft_s,
                                      time.perf_counter() - t0, bytes_read - read_before, 0, text,
                                      score(TASKS[call.task], text, call.gold)))
    for kv_id in list(on_disk):
        forget(kv_id)
    return summarize(records) | {
        "policy": "swapping (llama.cpp)", "budget_bytes": budget_bytes, "max_resident_bytes": peak_bytes,
        "bytes_read": bytes_read, "bytes_written": bytes_written, "recomputed_tokens": 0, "faults": 0,
        "resets": resets, "calls": len(records), "skipped_calls": skipped, "wall_s": time.perf_counter() - started,
        "written_bytes_per_token": KVSpec.from_config(loaded.config).bytes_per_token("fp16"),
        "records": [vars(r) for r in records],
    }


def run_peer(trace: Trace, budget_bytes: int, max_context_tokens: int, directory: Path | None = None) -> dict:
    """Replay the trace on llama.cpp in a worker process; the same metrics as llmaas.bench.replay.replay."""
    from llmaas.paths import default_model_path

    with tempfile.TemporaryDirectory(prefix="llmaas-peer-", dir=directory) as tmp:
        trace.save(Path(tmp) / "trace.jsonl")
        cmd = [sys.executable, "-m", "llmaas.bench.switch_peer", "--model", str(default_model_path()), "--trace",
               str(Path(tmp) / "trace.jsonl"), "--budget-bytes", str(budget_bytes), "--max-context-tokens",
               str(max_context_tokens), "--dir", str(Path(tmp) / "states")]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the llama.cpp trace worker failed (exit {out.returncode}); see its messages above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmaas.bench.switch_peer", description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--budget-bytes", type=int, required=True)
    p.add_argument("--max-context-tokens", type=int, default=2048)
    p.add_argument("--dir", type=Path, required=True, help="where evicted states are written (the disk to measure)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    result = run_in_process(args.model, Trace.load(args.trace), args.budget_bytes, args.max_context_tokens,
                            args.dir, args.threads)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
