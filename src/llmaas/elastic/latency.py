"""Measured latency of sub-models: TTFT (prefill of L tokens) and TPOT (one decode step) per (level, prompt length),
the m*p proxy next to it, and the level switch time.

Owns the measurement protocol (fp16 KV as served, one warm-up, median of `runs`; decode after a 128-token prompt)
and the profile file `latency.json` beside the artifact. Ignores which sub-model is worth choosing.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmaas.elastic.model import ElasticModel
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.lora import ModelLora
from llmaas.model.transformer import Transformer
from llmaas.model.widths import ModelWidths

PROMPT_LENGTHS = (128, 256, 512)
DECODE_PROMPT_TOKENS = 128


@dataclass(frozen=True)
class LatencyConfig:
    prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS
    runs: int = 5
    decode_steps: int = 16


def _ids(config, n: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))


@torch.no_grad()
def ttft_s(model: Transformer, widths: ModelWidths | None, lora: ModelLora | None, tokens: int, runs: int) -> float:
    """Median prefill time of `tokens` tokens into a fresh fp16 cache, after one warm-up: the layers over the prompt
    and the LM head over its last row only, as the engine serves a prompt (the head over every row would add a fixed
    ~20% that no sub-model can shed)."""
    ids, spec = _ids(model.config, tokens), KVSpec.from_config(model.config)
    times = []
    for _ in range(runs + 1):
        cache = DenseKVCache(spec, tokens)
        t0 = time.perf_counter()
        h = model.run_layers(model.embed(ids), torch.arange(tokens), cache.append(tokens), widths=widths, lora=lora)
        model.logits(h[-1:])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


@torch.no_grad()
def tpot_s(model: Transformer, widths: ModelWidths | None, lora: ModelLora | None, steps: int) -> float:
    """Median single-token decode step after a DECODE_PROMPT_TOKENS prompt (greedy feedback)."""
    n = DECODE_PROMPT_TOKENS
    cache = DenseKVCache(KVSpec.from_config(model.config), n + steps + 1)
    logits = model.forward(_ids(model.config, n), torch.arange(n), cache.append(n), widths=widths, lora=lora)
    times = []
    for i in range(steps + 1):
        token = logits[-1].argmax().view(1)
        t0 = time.perf_counter()
        logits = model.forward(token, torch.tensor([n + i]), cache.append(1), widths=widths, lora=lora)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def switch_s(view, levels: tuple[int, ...] = MODEL_LEVELS, repeats: int = 20_000) -> float:
    """Mean time of one level switch (`view(level)`), cycling through the levels."""
    t0 = time.perf_counter()
    for i in range(repeats):
        view(levels[i % len(levels)])
    return (time.perf_counter() - t0) / repeats


def profile_levels(elastic: ElasticModel, config: LatencyConfig | None = None, log=print) -> dict:
    """The latency table of every level (with its adapter when trained), with proxy errors and the switch time."""
    config = config or LatencyConfig()
    model = elastic.loaded.model
    rows = {}
    for m in MODEL_LEVELS:
        sub = elastic.view(m)
        row = {"lora": sub.lora is not None, "tpot_s": tpot_s(model, sub.widths, sub.lora, config.decode_steps),
               "ttft_s": {str(n): ttft_s(model, sub.widths, sub.lora, n, config.runs) for n in config.prompt_lengths}}
        rows[model_level_name(m)] = row
        log(f"  level {model_level_name(m)}: TPOT {row['tpot_s'] * 1e3:.1f} ms, TTFT "
            + ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in row["ttft_s"].items()))
    full = rows[model_level_name(10)]
    for m in MODEL_LEVELS:
        row = rows[model_level_name(m)]
        row["tpot_fraction"] = row["tpot_s"] / full["tpot_s"]
        row["ttft_fraction"] = {n: t / full["ttft_s"][n] for n, t in row["ttft_s"].items()}
        row["proxy"] = m / 10
        row["tpot_proxy_error"] = row["tpot_fraction"] - m / 10
        row["ttft_proxy_error"] = {n: f - m / 10 for n, f in row["ttft_fraction"].items()}
    switch = switch_s(elastic.view)
    median_ttft = statistics.median(t for r in rows.values() for t in r["ttft_s"].values())
    return {"levels": rows, "switch_s": switch, "switch_fraction_of_median_ttft": switch / median_ttft,
            "protocol": {"runs": config.runs, "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
                         "decode_steps": config.decode_steps, "kv": "fp16", "threads": torch.get_num_threads()}}


def write_profile(elastic: ElasticModel, config: LatencyConfig, extra_json: Path | None = None) -> dict:
    """Measure the profile and write it beside the artifact (and to `extra_json`); returns it."""
    result = profile_levels(elastic, config)
    for path in [elastic.directory / "latency.json"] + ([extra_json] if extra_json else []):
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    print(f"switch: {result['switch_s'] * 1e6:.2f} us = {result['switch_fraction_of_median_ttft']:.2e} of median TTFT")
    return result
