"""Measured latency of sub-models: TTFT (prefill of L tokens) and TPOT (one decode step) per (level, prompt length),
the m*p proxy next to it, the tiny LM's own latency per window, and the level switch time; and the table that the
runtime's measured feasibility reads (ELASTILM.md §4, §8: the TLM's time counts toward TTFT).

Owns the measurement protocol (fp16 KV as served; `runs` rounds over every level after a warm-up round, the median
of each; decode after a 128-token prompt), the profile file `latency.json` beside the artifact, and reading it back
(TTFT between measured lengths is linear, beyond the longest it follows the last segment's slope). Ignores which
sub-model is worth choosing.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TypeVar

import torch

from llmaas.elastic.model import ElasticModel
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.elastic.slo import Config, Feasible, kept_context_tokens
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.linear import BF16
from llmaas.model.lora import ModelLora
from llmaas.model.transformer import Transformer
from llmaas.model.widths import ModelWidths

PROMPT_LENGTHS = (128, 256, 512, 1024)
TLM_TOKENS = (128, 256, 512)  # one window each; a longer context costs one more window per 512 tokens
DECODE_PROMPT_TOKENS = 128
K, T = TypeVar("K"), TypeVar("T")


@dataclass(frozen=True)
class LatencyConfig:
    prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS
    runs: int = 11  # rounds; level by level, 11-run medians were still non-monotone in the level here (2026-12-05)
    decode_steps: int = 16
    tlm_tokens: tuple[int, ...] = TLM_TOKENS


def _ids(config, n: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))


@torch.no_grad()
def ttft_once_s(model: Transformer, widths: ModelWidths | None, lora: ModelLora | None, tokens: int) -> float:
    """One prefill of `tokens` tokens into a fresh fp16 cache: the layers over the prompt and the LM head over its
    last row only, as the engine serves a prompt (the head over every row would add a fixed ~20% that no sub-model
    can shed)."""
    ids, spec = _ids(model.config, tokens), KVSpec.from_config(model.config)
    cache = DenseKVCache(spec, tokens)
    t0 = time.perf_counter()
    h = model.run_layers(model.embed(ids), torch.arange(tokens), cache.append(tokens), widths=widths, lora=lora)
    model.logits(h[-1:])
    return time.perf_counter() - t0


def ttft_s(model: Transformer, widths: ModelWidths | None, lora: ModelLora | None, tokens: int, runs: int) -> float:
    """Median of `runs` prefills (`ttft_once_s`) after one warm-up."""
    times = [ttft_once_s(model, widths, lora, tokens) for _ in range(runs + 1)]
    return statistics.median(times[1:])


def in_rounds(measures: dict[K, Callable[[], T]], runs: int, log: Callable[[str], object] | None = None,
              ) -> dict[K, list[T]]:
    """Each measure's results over `runs` rounds, every round calling every measure once, after a warm-up round
    whose results are dropped. Rather than all runs of one setting before the next: on a shared host the machine's
    speed drifts over minutes, and measured one after another the drift lands on some settings only (level 0.7's
    TPOT above 0.8's at 11 runs each); in rounds, a slow minute costs every setting alike."""
    out: dict[K, list[T]] = {k: [] for k in measures}
    started = time.perf_counter()
    for r in range(runs + 1):
        for k, measure in measures.items():
            result = measure()
            if r:
                out[k].append(result)
        if log is not None:
            spent = time.perf_counter() - started
            log(f"  round {r + 1}/{runs + 1} ({'warm-up' if r == 0 else 'measured'}): {spent:.0f} s, ETA "
                f"{spent / (r + 1) * (runs - r):.0f} s")
    return out


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
    views = {m: elastic.view(m) for m in MODEL_LEVELS}
    runs = in_rounds({m: (lambda sub=sub: (tpot_s(model, sub.widths, sub.lora, config.decode_steps),
                                           {n: ttft_once_s(model, sub.widths, sub.lora, n)
                                            for n in config.prompt_lengths}))
                      for m, sub in views.items()}, config.runs, log)
    rows = {}
    for m, sub in views.items():
        row = {"lora": sub.lora is not None, "tpot_s": statistics.median(t for t, _ in runs[m]),
               "ttft_s": {str(n): statistics.median(s[n] for _, s in runs[m]) for n in config.prompt_lengths}}
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
    tlm = tlm_latency(config.runs, config.tlm_tokens, elastic.loaded.gemm == BF16)
    log("  tiny LM (dual head, one window): " + ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in tlm.items()))
    switch = switch_s(elastic.view)
    median_ttft = statistics.median(t for r in rows.values() for t in r["ttft_s"].values())
    return {"levels": rows, "tlm_s": tlm, "switch_s": switch, "switch_fraction_of_median_ttft": switch / median_ttft,
            "protocol": {"runs": config.runs, "decode_prompt_tokens": DECODE_PROMPT_TOKENS,
                         "gemm": elastic.loaded.gemm,
                         "decode_steps": config.decode_steps, "kv": "fp16", "threads": torch.get_num_threads()}}


@torch.inference_mode()
def tlm_latency(runs: int, lengths: tuple[int, ...] = TLM_TOKENS, bf16: bool = False) -> dict[str, float]:
    """Median time of the dual-head tiny LM's pass over one window of n tokens, as served (DualHeadTLM.serve: both
    branches, no autograd, bf16 matmuls where the LLM's prefill is bf16): what a request pays before the LLM starts.
    After one warm-up. Trained weights do not change it, so the pretrained encoder with fresh heads stands in."""
    from llmaas.elastic.dual_head import DualHeadTLM
    from llmaas.paths import tiny_lm_dir
    from llmaas.tlm.encoder import BertEncoder
    model = DualHeadTLM(BertEncoder.load(tiny_lm_dir())).eval()
    model.serve_bf16 = bf16
    out = {}
    for n in lengths:
        ids = torch.randint(0, model.base_vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        mask = torch.ones_like(ids)
        times = []
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            model.serve(ids, mask)
            times.append(time.perf_counter() - t0)
        out[str(n)] = statistics.median(times[1:])
    return out


class LatencyTable:
    """The measured profile as the runtime reads it: TTFT of a level at any prompt length, its TPOT, and the tiny
    LM's time for a number of encoder tokens."""

    def __init__(self, profile: dict) -> None:
        try:
            levels = profile["levels"]
            self._lengths = sorted(int(n) for n in levels[model_level_name(10)]["ttft_s"])
            # non-decreasing in length (a running maximum): one noisy point must not make a longer prompt look cheaper
            self._ttft = {m: list(accumulate((levels[model_level_name(m)]["ttft_s"][str(n)] for n in self._lengths),
                                             max)) for m in MODEL_LEVELS}
            self._tpot = {m: levels[model_level_name(m)]["tpot_s"] for m in MODEL_LEVELS}
            tlm = profile["tlm_s"]
        except KeyError as exc:
            raise ValueError(f"the latency profile lacks {exc}: measure it again with `llmaas elastic "
                             "profile`") from exc
        self._tlm_lengths = sorted(int(n) for n in tlm)
        self._tlm = [tlm[str(n)] for n in self._tlm_lengths]
        if len(self._lengths) < 2 or len(self._tlm) < 2:
            raise ValueError("the latency profile needs two prompt lengths and two tiny-LM window sizes; measure it "
                             "again with `llmaas elastic profile`")

    @staticmethod
    def digest(directory: Path) -> str | None:
        """A hash of the profile file (None when there is none): what decision labels under the measured rule were
        derived from, so that a re-measured table (e.g. a faster engine) retrains the head on its own feasibility."""
        path = directory / "latency.json"
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None

    @classmethod
    def load(cls, directory: Path, gemm: str | None = None) -> LatencyTable:
        """The table in `directory`; with `gemm`, refused (ValueError) when it was measured on another prefill path
        (tables from before the path was recorded were measured on fp32)."""
        path = directory / "latency.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `llmaas elastic profile`")
        record = json.loads(path.read_text())
        measured = record.get("protocol", {}).get("gemm", "fp32")
        if gemm is not None and measured != gemm:
            raise ValueError(f"{path} was measured on the {measured} prefill path and the model now runs {gemm}: "
                             "measure it again with `llmaas elastic profile`")
        return cls(record)

    def ttft_s(self, m: int, tokens: int) -> float:
        return _interpolate(self._lengths, self._ttft[m], tokens)

    def tpot_s(self, m: int) -> float:
        return self._tpot[m]

    def tlm_s(self, encoder_tokens: int) -> float:
        """Full 512-token windows, plus the last partial one, each from the measured window times."""
        from llmaas.elastic.dual_head import MAX_TOKENS
        full, rest = divmod(max(1, encoder_tokens), MAX_TOKENS)
        one = _interpolate(self._tlm_lengths, self._tlm, MAX_TOKENS) if full else 0.0
        return full * one + (_interpolate(self._tlm_lengths, self._tlm, rest) if rest else 0.0)


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys), extended by the end segments' slopes, never below 0."""
    k = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def measured_feasible(table: LatencyTable, budgets_s: tuple[float, float], context_tokens: int, query_tokens: int,
                      tlm_s: float) -> Feasible:
    """Measured-mode feasibility (§8 as decided for llmaas): the tiny LM's time plus the level's prefill of the
    kept context and the whole query within the TTFT budget, and the level's TPOT within the TPOT budget."""
    ttft_budget, tpot_budget = budgets_s

    def feasible(c: Config) -> bool:
        kept = kept_context_tokens(c.p, context_tokens, query_tokens) + query_tokens
        return tlm_s + table.ttft_s(c.m, kept) <= ttft_budget and table.tpot_s(c.m) <= tpot_budget
    return feasible


def predicted_ttft_s(table: LatencyTable, c: Config, context_tokens: int, query_tokens: int) -> float:
    """The table's TTFT of a config, the tiny LM's time excluded."""
    return table.ttft_s(c.m, kept_context_tokens(c.p, context_tokens, query_tokens) + query_tokens)


def write_profile(elastic: ElasticModel, config: LatencyConfig, extra_json: Path | None = None) -> dict:
    """Measure the profile and write it beside the artifact (and to `extra_json`); returns it."""
    result = profile_levels(elastic, config)
    for path in [elastic.directory / "latency.json"] + ([extra_json] if extra_json else []):
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    print(f"switch: {result['switch_s'] * 1e6:.2f} us = {result['switch_fraction_of_median_ttft']:.2e} of median TTFT")
    return result
