"""One engine's measurements in its own process (so peak RSS is its own): `python -m llmaas.bench.engine_worker`.

Owns the protocol: load time, prefill at each size, decode at each context, medians over repeats after a warm-up,
peak RSS; for ours also the cost of collecting attention statistics. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _median(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch of weights and buffers, kernel caches
    return statistics.median(fn() for _ in range(repeats))


def _progress(started: float, what: str, tok_s: float) -> None:
    print(f"    {what}: {tok_s:.1f} tok/s ({time.perf_counter() - started:.0f} s elapsed)", file=sys.stderr,
          flush=True)


def measure(adapter, ids: list[int], prefill_sizes: list[int], decode_contexts: list[int], decode_tokens: int,
            repeats: int, label: str = "") -> dict:
    started = time.perf_counter()
    prefill, decode = {}, {}
    for n in prefill_sizes:
        prefill[str(n)] = n / _median(lambda n=n: adapter.prefill_s(ids[:n]), repeats)
        _progress(started, f"{label}prefill {n}", prefill[str(n)])
    for n in decode_contexts:
        decode[str(n)] = decode_tokens / _median(lambda n=n: adapter.decode_s(ids[:n], decode_tokens), repeats)
        _progress(started, f"{label}decode at {n}", decode[str(n)])
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


@contextlib.contextmanager
def _competing_process(busy: bool) -> Iterator[None]:
    """With `busy`, a CPU-bound process (one core's worth of spinning) runs beside the measurement, as an app busy
    on the device would; a second passes before measuring so that a governor has seen it."""
    if not busy:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield
    finally:
        hog.kill()
        hog.wait()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that across fork and
    exec, so a worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmaas.bench.engine_worker")
    p.add_argument("engine", choices=["ours", "llama_cpp", "transformers"])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True, help="JSON list of token ids to prefill")
    p.add_argument("--threads", default="2", help="a count, or auto (ours only: the service's governor)")
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--decode", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemm", default="auto", help="ours: the prefill matmul path (auto, fp32, bf16)")
    p.add_argument("--busy", action="store_true",
                   help="measure beside a competing CPU-bound process (one busy core), started after loading")
    args = p.parse_args(argv)
    threads = args.threads if args.threads == "auto" else int(args.threads)
    ids = json.loads(args.ids.read_text())
    from llmaas.bench import engine_adapters as ea

    t0 = time.perf_counter()
    if args.engine == "ours":
        adapter = ea.OursAdapter(args.model, threads, gemm=args.gemm)
    elif args.engine == "llama_cpp":
        adapter = ea.LlamaCppAdapter(args.model, int(threads), n_ctx=max(args.decode + args.prefill) +
                                     args.decode_tokens)
    else:
        adapter = ea.TransformersAdapter(args.model, int(threads))
    load_s = time.perf_counter() - t0
    with _competing_process(args.busy):
        result = {"load_s": load_s, **measure(adapter, ids, args.prefill, args.decode, args.decode_tokens,
                                              args.repeats)}
    if args.engine == "ours":
        import torch

        result["gemm"] = adapter.loaded.gemm
        result["threads_at_end"] = torch.get_num_threads()  # with auto: what the governor settled on
    if args.engine == "ours" and not args.busy:
        # the same prefill and decode with attention statistics on: explicit softmax instead of fused attention
        adapter.stats = True
        with_stats = measure(adapter, ids, [512], [512], args.decode_tokens, args.repeats, "with statistics: ")
        result["stats_overhead"] = {
            "prefill_512": result["prefill_tok_s"]["512"] / with_stats["prefill_tok_s"]["512"] - 1,
            "decode_512": result["decode_tok_s"]["512"] / with_stats["decode_tok_s"]["512"] - 1,
        }
    if args.engine == "llama_cpp":
        result["build"] = ea.LlamaCppAdapter.build()
    result["peak_rss_mb"] = peak_rss_mb()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
