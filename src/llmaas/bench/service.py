"""`llmaas bench service`: what the service path costs over calling the engine directly (TTFT and tokens/s).

Owns one comparison, run one side after the other on the same prompts: the engine in this process (chat-formatted
prompt, fresh KV, greedy) versus a real `llmaas serve` process reached over its Unix socket with the Python client
(a fresh context per prompt), timed as a client sees it. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmaas.bench.results import machine, write_json

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Describe a walk through a forest in autumn.", "What makes a good cup of tea? Explain in detail.",
           "Tell me about the history of the printing press.", "Describe the water cycle to a child.",
           "Write a letter to a friend about a trip to the mountains.", "Explain why the sky is blue."]


class Direct:
    """The engine in this process: chat-formatted prompt, fresh KV, greedy."""

    def __init__(self) -> None:
        import torch

        from llmaas.engine.generate import Generator
        from llmaas.model.loader import load_model

        torch.set_num_threads(2)
        self.loaded = load_model()
        self.gen = Generator(self.loaded.model, self.loaded.tokenizer)

    def run(self, prompt: str, max_tokens: int) -> dict:
        from llmaas.engine.generate import Finished, GenerateRequest
        from llmaas.kv.dense import DenseKVCache
        from llmaas.kv.spec import KVSpec

        tok, template = self.loaded.tokenizer, self.loaded.chat_template
        ids = tok.encode(template.render([{"role": "user", "content": prompt}]))
        cache = DenseKVCache(KVSpec.from_config(self.loaded.config), len(ids) + max_tokens)
        done = next(e for e in self.gen.stream(GenerateRequest(tuple(ids), max_tokens), cache)
                    if isinstance(e, Finished))
        return {"ttft_s": done.timings.ttft_s, "decode_tok_s": done.timings.decode_tok_s,
                "completion_tokens": len(done.token_ids)}


class ThroughService:
    """A real `llmaas serve` process, called over its Unix socket with the Python client, timed client-side."""

    def __init__(self) -> None:
        from llmaas.client import Client
        from llmaas.paths import DataDir
        from llmaas.service.process import start_service
        from llmaas.storage.catalog import Catalog

        home = DataDir(Path(tempfile.mkdtemp(prefix="llmaas-bench-"))).create()
        catalog = Catalog(home.catalog)
        key = catalog.add_app("bench")[1]
        catalog.close()
        self.proc = start_service(home, ["--threads", "2"])
        self.client = Client(key, socket=home.socket)

    def run(self, prompt: str, max_tokens: int) -> dict:
        from llmaas.client import CallReply

        ctx = self.client.new_context()
        t0 = time.perf_counter()
        first = last = reply = None
        for piece in self.client.stream(ctx, prompt, max_tokens=max_tokens):
            now = time.perf_counter()
            if isinstance(piece, CallReply):
                reply = piece
            else:
                first = first or now
                last = now
        self.client.delete(ctx)
        n = reply.usage["completion_tokens"]
        return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (last - first) if n > 1 else 0.0,
                "completion_tokens": n, "server_ttft_s": reply.timings["ttft_s"],
                "server_switch_s": reply.timings["switch_s"], "server_decode_tok_s": reply.timings["decode_tok_s"]}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas bench service", description=__doc__)
    p.add_argument("--max-tokens", type=int, default=64, help="reply length per call (default: 64)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    args = p.parse_args(argv)
    print("starting `llmaas serve` and loading the model here ...", file=sys.stderr, flush=True)
    service, engine = ThroughService(), Direct()
    d, s = [], []
    try:
        engine.run(PROMPTS[0], args.max_tokens), service.run(PROMPTS[0], args.max_tokens)  # warm-up
        for i, prompt in enumerate(PROMPTS):  # alternate, so drift in machine speed hits both sides alike
            d.append(engine.run(prompt, args.max_tokens))
            s.append(service.run(prompt, args.max_tokens))
            print(f"  {i + 1}/{len(PROMPTS)}: direct {d[-1]['decode_tok_s']:.0f} tok/s, service "
                  f"{s[-1]['decode_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
    finally:
        service.close()
    summary = {
        "direct": {"ttft_s": _median(d, "ttft_s"), "decode_tok_s": _median(d, "decode_tok_s")},
        "service": {"ttft_s": _median(s, "ttft_s"), "decode_tok_s": _median(s, "decode_tok_s"),
                    "server_ttft_s": _median(s, "server_ttft_s"), "server_switch_s": _median(s, "server_switch_s"),
                    "server_decode_tok_s": _median(s, "server_decode_tok_s")},
    }
    summary["overhead"] = {
        "ttft_ms": 1000 * (summary["service"]["ttft_s"] - summary["direct"]["ttft_s"]),
        "ttft_ratio": summary["service"]["ttft_s"] / summary["direct"]["ttft_s"],
        "decode_ratio": summary["service"]["decode_tok_s"] / summary["direct"]["decode_tok_s"],
    }
    result = {"config": {"prompts": len(PROMPTS), "max_tokens": args.max_tokens, "threads": 2},
              "machine": machine(), **summary, "runs": {"direct": d, "service": s}}
    o = summary["overhead"]
    direct_row, service_row = summary["direct"], summary["service"]
    print(f"{'':<22}{'TTFT ms':>10}{'decode tok/s':>14}\n"
          f"{'direct engine':<22}{1000 * direct_row['ttft_s']:>10.1f}{direct_row['decode_tok_s']:>14.1f}\n"
          f"{'service (client view)':<22}{1000 * service_row['ttft_s']:>10.1f}{service_row['decode_tok_s']:>14.1f}\n"
          f"overhead: TTFT +{o['ttft_ms']:.1f} ms (x{o['ttft_ratio']:.2f}), decode x{o['decode_ratio']:.2f} "
          f"(medians of {len(PROMPTS)} prompts)")
    if args.json:
        write_json(result, args.json)
    return 0
