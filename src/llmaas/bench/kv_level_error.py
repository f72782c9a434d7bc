"""`llmaas eval kv --level-error`: measure the level errors e(w) that llmaas.kv.codec.LEVEL_ERROR hard-codes.

e(w) is the mean of the relative MSEs of K and V at level w against the INT8 values, pooled over every element of
every chunk and layer of the model's KV of alpaca calibration text (the train sample, not the WikiText-2 text the
perplexity harness scores). Reuses eval kv's chunk plumbing and the store's INT8 -> INT4/INT2 path; ignores tasks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmaas.bench.eval_kv import decoded_levels
from llmaas.bench.results import write_json
from llmaas.kv import codec
from llmaas.kv.chunking import contiguous_spans, cut_chunks
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.loader import LoadedModel
from llmaas.model.tokenizer import Tokenizer
from llmaas.model.transformer import Transformer
from llmaas.paths import SHARED_DATA_DIR

ALPACA = SHARED_DATA_DIR / "alpaca" / "train_sample.jsonl"
ALPACA_ROWS = 400  # the calibration text: instruction, input and output of the first rows, about 38k tokens
LEVELS = (KVLevel.INT8, KVLevel.INT4, KVLevel.INT2)


@dataclass(frozen=True)
class LevelErrorConfig:
    num_seqs: int = 4  # consecutive calibration sequences, each prefilled from position 0
    seq_tokens: int = 1024
    chunk_tokens: int = codec.DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.num_seqs < 1 or self.seq_tokens < self.chunk_tokens or self.seq_tokens % self.chunk_tokens:
            raise ValueError(f"need at least one sequence of a whole number of {self.chunk_tokens}-token chunks; "
                             f"got {self.num_seqs} x {self.seq_tokens} tokens")


QUICK = LevelErrorConfig(num_seqs=1, seq_tokens=256)


def calibration_ids(tokenizer: Tokenizer, cfg: LevelErrorConfig) -> list[torch.Tensor]:
    """cfg.num_seqs consecutive cfg.seq_tokens-token pieces of the alpaca calibration text."""
    with ALPACA.open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(ALPACA_ROWS), f, strict=False)]
    text = "\n\n".join("\n".join(s for s in (r["instruction"], r["input"], r["output"]) if s) for r in rows)
    ids = torch.tensor(tokenizer.encode(text))
    if ids.numel() < cfg.num_seqs * cfg.seq_tokens:
        raise ValueError(f"the calibration text has {ids.numel()} tokens; {cfg.num_seqs} x {cfg.seq_tokens} need more")
    return [ids[i * cfg.seq_tokens:(i + 1) * cfg.seq_tokens] for i in range(cfg.num_seqs)]


def level_errors(model: Transformer, spec: KVSpec, seqs: Sequence[torch.Tensor],
                 geom: ChunkGeometry) -> dict[str, dict[str, float]]:
    """Per level name: relative MSEs of K and V against the INT8 values (e: their mean) and against the fp16 values,
    each pooled over every chunk of every sequence (whole chunks only: a partial tail would dilute the pool)."""
    sums: dict[str, float] = {}

    def add(key: str, x: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(x.double().pow(2).sum())

    size = geom.chunk_tokens
    for ids in seqs:
        n = ids.numel()
        sealed = n - n % size
        cache = DenseKVCache(spec, n)
        model.run_layers(model.embed(ids), torch.arange(n), cache.append(n))  # the KV only: no LM head
        by_level = decoded_levels(*cut_chunks(cache.kv, contiguous_spans(sealed, size), size), geom)
        for i, name in enumerate("kv"):  # K, then V
            x, x8 = by_level[KVLevel.FP16][i], by_level[KVLevel.INT8][i]
            add(name, x)
            add(f"{name}8", x8)
            for level in LEVELS:
                add(f"{name}8-{level.name}", x8 - by_level[level][i])
                add(f"{name}-{level.name}", x - by_level[level][i])
    out = {}
    for level in LEVELS:
        ek, ev = sums[f"k8-{level.name}"] / sums["k8"], sums[f"v8-{level.name}"] / sums["v8"]
        out[level.name] = {"k_vs_int8": ek, "v_vs_int8": ev, "e": (ek + ev) / 2,
                           "k_vs_fp16": sums[f"k-{level.name}"] / sums["k"],
                           "v_vs_fp16": sums[f"v-{level.name}"] / sums["v"]}
    return out


def markdown(levels: dict[str, dict[str, float]]) -> str:
    """The table docs/KV_CODEC.md shows under Measurements."""
    lines = ["| Level | K rel. MSE vs INT8 | V rel. MSE vs INT8 | e(w) | K rel. MSE vs FP16 | V rel. MSE vs FP16 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['k_vs_int8']:.3e} | {r['v_vs_int8']:.3e} | {r['e']:.3e} | {r['k_vs_fp16']:.3e} | "
              f"{r['v_vs_fp16']:.3e} |" for name, r in levels.items()]
    return "\n".join(lines)


def run(loaded: LoadedModel, cfg: LevelErrorConfig, json_path: Path | None = None,
        command: str = "llmaas eval kv --level-error") -> dict:
    """Measure e(w) on cfg's calibration text, print the table and the LEVEL_ERROR line, and, if asked, set the
    `level_error` entry of the JSON file (keeping its other entries) to {data, levels, command, model, machine,
    threads, runtime_s}; return that entry."""
    from llmaas.bench.results import machine

    t0 = time.perf_counter()
    print(f"measuring e(w) on {cfg.num_seqs} x {cfg.seq_tokens} alpaca tokens", file=sys.stderr, flush=True)
    spec = KVSpec.from_config(loaded.config)
    levels = level_errors(loaded.model, spec, calibration_ids(loaded.tokenizer, cfg),
                          ChunkGeometry(spec, cfg.chunk_tokens))
    entry = {"data": f"alpaca train_sample, {cfg.num_seqs} x {cfg.seq_tokens} tokens", "levels": levels,
             "command": command, "model": loaded.config.name, "machine": machine(),
             "threads": torch.get_num_threads(), "runtime_s": time.perf_counter() - t0}
    print(markdown(levels))
    print("LEVEL_ERROR =", {name: float(f"{r['e']:.3g}") for name, r in levels.items()})
    print(f"runtime {entry['runtime_s']:.0f} s")
    if json_path:
        # docs/kv_codec.json also keeps the one-off axis study and decode timing: replace only this entry
        doc = json.loads(json_path.read_text()) if json_path.exists() else {}
        doc["level_error"] = entry
        write_json(doc, json_path, indent=1)
    return entry
