"""`llmaas bench engine`: our engine next to llama.cpp and HF transformers on the same GGUF, in one run.

Owns the run: the token ids (WikiText-2, the same for every engine), one worker process per engine (run one after
another, never concurrently), the table, the JSON and the plot. Peers that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmaas.bench.plotting import pyplot
from llmaas.bench.results import machine, write_json
from llmaas.model.config import ModelConfig
from llmaas.model.gguf_file import GGUFFile
from llmaas.model.tokenizer import Tokenizer
from llmaas.paths import default_model_path

PEERS = {"llama-cpp": ("llama_cpp", "llama_cpp"), "transformers": ("transformers", "transformers")}
WIKITEXT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "wikitext2" / "test.raw.txt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas bench engine", description=__doc__)
    p.add_argument("--peer", action="append", default=[], choices=sorted(PEERS),
                   help="also measure this peer (repeatable; needs the `peers` extra)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results here (and a PNG beside it)")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=Path, default=WIKITEXT, help=f"text to prefill (default: {WIKITEXT})")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point, median reported (default: 3)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per decode measurement (default: 64)")
    p.add_argument("--contention", action="store_true",
                   help="instead: prefill@512 and decode@512, quiet and beside one competing busy process, for ours "
                        "with --threads auto (the service's default), ours with --threads fixed, and each peer")
    return p


def run_worker(engine: str, args: argparse.Namespace, model: Path, ids_file: Path, gemm: str = "auto",
               threads: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "llmaas.bench.engine_worker", engine, "--model", str(model), "--ids", str(ids_file),
           "--threads", threads or str(args.threads), "--repeats", str(args.repeats), "--decode-tokens",
           str(args.decode_tokens), "--gemm", gemm, *extra]
    print(f"measuring {engine}{f' (gemm {gemm})' if gemm != 'auto' else ''} {' '.join(extra)} ...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its progress lines go straight to our stderr
    if out.returncode != 0:
        raise RuntimeError(f"the {engine} worker failed (exit {out.returncode}); see its messages above")
    print(f"  {engine} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer for speeds (above 1 = we are faster); peer / ours for load time and RSS (above 1 = we use less)."""
    return {
        "prefill_tok_s": {k: ours["prefill_tok_s"][k] / v for k, v in peer["prefill_tok_s"].items()},
        "decode_tok_s": {k: ours["decode_tok_s"][k] / v for k, v in peer["decode_tok_s"].items()},
        "load_s": peer["load_s"] / ours["load_s"],
        "peak_rss_mb": peer["peak_rss_mb"] / ours["peak_rss_mb"],
    }


def table(result: dict) -> str:
    engines = {f"ours ({result['ours']['gemm']})": result["ours"], **result["paths"], **result["peers"]}
    cols = ["prefill@128", "prefill@512", "prefill@2048", "decode@512", "decode@2048", "load s", "peak RSS MB"]
    lines = [f"{'engine':<14}" + "".join(f"{c:>14}" for c in cols)]
    for name, r in engines.items():
        cells = [r["prefill_tok_s"][k] for k in ("128", "512", "2048")] + [r["decode_tok_s"][k] for k in
                                                                            ("512", "2048")]
        cells += [r["load_s"], r["peak_rss_mb"]]
        lines.append(f"{name:<14}" + "".join(f"{c:>14.1f}" for c in cells))
    for name, rr in result["ratios"].items():
        cells = [rr["prefill_tok_s"][k] for k in ("128", "512", "2048")] + [rr["decode_tok_s"][k] for k in
                                                                             ("512", "2048")]
        cells += [rr["load_s"], rr["peak_rss_mb"]]
        lines.append(f"{'x vs ' + name:<14}" + "".join(f"{c:>14.2f}" for c in cells))
    lines.append("(tok/s; ratios are ours/peer for speed and peer/ours for load time and RSS: above 1 = ours better; "
                 "ours = the prefill path this CPU picks, the other rows force one)")
    return "\n".join(lines)


CONTENTION_SIZES = ("--prefill", "512", "--decode", "512")


def contention(args: argparse.Namespace, model: Path, ids_file: Path) -> dict:
    """Each engine quiet and beside one busy process, one after another (never two measurements at once)."""
    engines = [("ours, threads auto", "ours", "auto"), (f"ours, {args.threads} threads", "ours", str(args.threads))]
    engines += [(f"{PEERS[p][1]}, {args.threads} threads", PEERS[p][1], str(args.threads)) for p in args.peer
                if importlib.util.find_spec(PEERS[p][0]) is not None]
    rows = {}
    for label, engine, threads in engines:
        quiet = run_worker(engine, args, model, ids_file, threads=threads, extra=CONTENTION_SIZES)
        busy = run_worker(engine, args, model, ids_file, threads=threads, extra=(*CONTENTION_SIZES, "--busy"))
        rows[label] = {"quiet": quiet, "busy": busy,
                       "kept": {"prefill_512": busy["prefill_tok_s"]["512"] / quiet["prefill_tok_s"]["512"],
                                "decode_512": busy["decode_tok_s"]["512"] / quiet["decode_tok_s"]["512"]}}
    return rows


def contention_table(rows: dict) -> str:
    head = ["prefill quiet", "prefill busy", "kept", "decode quiet", "decode busy", "kept"]
    lines = [f"{'engine':<24}" + "".join(f"{c:>14}" for c in head)]
    for label, r in rows.items():
        q, b, k = r["quiet"], r["busy"], r["kept"]
        cells = [q["prefill_tok_s"]["512"], b["prefill_tok_s"]["512"], k["prefill_512"],
                 q["decode_tok_s"]["512"], b["decode_tok_s"]["512"], k["decode_512"]]
        lines.append(f"{label:<24}" + "".join(f"{c:>14.2f}" if i in (2, 5) else f"{c:>14.1f}"
                                               for i, c in enumerate(cells)))
    lines.append("(tok/s at 512 tokens; busy = beside one CPU-bound process; kept = busy / quiet)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    engines = {f"ours ({result['ours']['gemm']})": result["ours"], **result["paths"], **result["peers"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, sizes, title in ((axes[0], "prefill_tok_s", ("128", "512", "2048"), "prefill (tokens)"),
                                  (axes[1], "decode_tok_s", ("512", "2048"), "decode (context tokens)")):
        width = 0.8 / len(engines)
        for i, (name, r) in enumerate(engines.items()):
            ax.bar([x + i * width for x in range(len(sizes))], [r[key][s] for s in sizes], width, label=name)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(sizes))], sizes)
        ax.set_title(f"{title}: tokens/s, {result['config']['threads']} threads")
        ax.set_ylabel("tokens / s")
        ax.legend()
    fig.suptitle(f"{result['config']['model']} on {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    gguf_file = GGUFFile(args.model if args.model is not None else default_model_path())
    config = ModelConfig.from_gguf(gguf_file)
    ids = Tokenizer.from_gguf(gguf_file).encode(args.text.read_text(encoding="utf-8")[:40_000])
    if len(ids) < 2048 + args.decode_tokens:
        raise SystemExit(f"llmaas bench engine: {args.text} gives only {len(ids)} tokens; need 2112")
    result: dict = {"config": {"model": config.name, "model_path": str(gguf_file.path), "threads": args.threads,
                               "repeats": args.repeats, "decode_tokens": args.decode_tokens,
                               "text": str(args.text)},
                    "machine": machine(), "peers": {}, "ratios": {}, "missing_peers": {}, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids[:2048 + args.decode_tokens]))
        model = Path(result["config"]["model_path"])
        if args.contention:
            result["contention"] = contention(args, model, ids_file)
            print(contention_table(result["contention"]))
            if args.json:
                write_json(result, args.json)
            return 0
        result["ours"] = run_worker("ours", args, model, ids_file)
        if result["ours"]["gemm"] != "fp32":  # the exact path too, side by side: what the CPU's choice gains
            result["paths"]["ours (fp32)"] = run_worker("ours", args, model, ids_file, "fp32")
        for peer in args.peer:
            module, key = PEERS[peer]
            if importlib.util.find_spec(module) is None:
                result["missing_peers"][key] = f"not installed: pip install -e '.[peers]' (needs {module})"
                print(f"skipping {peer}: {result['missing_peers'][key]}", file=sys.stderr)
                continue
            result["peers"][key] = run_worker(key, args, model, ids_file)
            result["ratios"][key] = ratios(result["ours"], result["peers"][key])
    print(table(result))
    s = result["ours"]["stats_overhead"]
    print(f"attention statistics cost: prefill@512 +{100 * s['prefill_512']:.0f}%, "
          f"decode@512 +{100 * s['decode_512']:.0f}%")
    if args.json:
        write_json(result, args.json)
        png = args.json.with_suffix(".png")
        if plot(result, png):
            print(f"wrote {png}")
    return 0
