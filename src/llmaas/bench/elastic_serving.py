"""`llmaas bench elastic`: ElastiLM as the service runs it (the tiny LM's decision, word-level compression, sub-model m
with its LoRA) against model-only elasticity (LLMPruner), prompt compression with contextual sparsity
(Lingua2+Contextual), the layer-dropping and layer-merging baselines and the full model, at every SLO pair on every
available dataset and on the end-to-end traces, in proxy and measured mode (ELASTILM.md §9-§10).

Owns the systems' config rules, the run (every request scored by log-likelihood through the runtime's own scoring;
identical work is scored once), the statistics (Wilson 95% intervals; paired bootstrap of ElastiLM minus each
baseline), the traces (§9's class counts, seed 42, scaled down to the items evaluated when they are fewer), SLO
attainment, the JSON, the table and the plots.

Measured mode: each system picks its config by its own rule through measured latency (ElastiLM: the latency table
plus its tiny LM's measured time; LLMPruner: the largest level whose table TTFT and TPOT fit; the layer baselines
and LaCo: the largest ratio whose measured TTFT and TPOT fractions fit). Lingua2+Contextual's rule is fixed by the
SLO in both modes (prompt rate s_pre, FFN keep s_dec); its sparsity is emulated by masking, which buys no speed on
this engine, so its measured time is the compressed prompt through the full-cost FFN. Every request's time to
answer (tiny LM + compression + prefill and scoring) is measured, and it meets its SLO when it is within the SLO's
fraction of the full model's time on the same item, measured in the same run. Proxy mode uses the paper's m·p rule
for everyone and counts no time. Off-The-Shelf is not applicable (no smaller SmolLM2 exists offline), and listed as
such in the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmaas.bench.elastic_baselines import OwnModelBaselines
from llmaas.bench.eval_elastic import paired_bootstrap, wilson
from llmaas.bench.mc_tasks import AGENT, STANDALONE, MCItem, MCTask
from llmaas.bench.plotting import pyplot
from llmaas.bench.results import machine, write_json
from llmaas.elastic.baselines import BASELINES, baseline_widths
from llmaas.elastic.choices import choice_scores, prefill_context
from llmaas.elastic.dual_head import default_heads_path, heads_record, run_dual_head
from llmaas.elastic.latency import in_rounds, tpot_s, ttft_once_s
from llmaas.elastic.model_levels import MODEL_LEVELS
from llmaas.elastic.runtime import ElasticRuntime, mc_query_text
from llmaas.elastic.slo import (
    STANDALONE_SLOS,
    Config,
    Slo,
    SloRequest,
    baseline_ratio,
    llmpruner_config,
)
from llmaas.kv.dense import DenseKVCache
from llmaas.model.loader import load_model
from llmaas.model.lora import ModelLora
from llmaas.model.transformer import Transformer
from llmaas.model.widths import ModelWidths

DEFAULT_OUT = Path("out/bench_elastic")
MODES = ("measured", "proxy")
LAYER_BASELINES = (*BASELINES, "laco")  # picked by ratio r: fixed in proxy mode, by measured fractions otherwise
SYSTEMS = ("elastilm", "llmpruner", "lingua2_contextual", *LAYER_BASELINES, "full")
NOT_APPLICABLE = {"off_the_shelf": "SmolLM2-135M is the smallest of its family; no smaller model offline"}
# §9's end-to-end trace: SLO class (prefill, decode) -> its app's dataset; PIQA is not in ../shared/data
TRACE_CLASSES = (((10, 10), "openbookqa"), ((8, 9), "arc_easy"), ((6, 8), "octopus"), ((4, 7), "llamatouch"),
                 ((2, 6), "piqa"), ((2, 5), "sciq"))
ALPHAS = (0.0, 0.25, -0.25)
TRACE_SIZE = 600


@dataclass(frozen=True)
class BenchConfig:
    items: int = 60  # per dataset (the spec's full plan: >= 300)
    datasets: tuple[str, ...] = ("arc_easy", "openbookqa", "sciq", "mmlu", "octopus", "llamatouch")
    latency_runs: int = 5  # rounds of the layer baselines' latency fractions
    bootstrap: int = 10_000
    seed: int = 42


@dataclass(frozen=True)
class Outcome:
    correct: bool
    time_s: float  # tiny LM + compression + scoring
    setting: str  # what ran, e.g. "m0.6,p0.4" or "shortgpt@0.7"
    met: bool | None = None  # set afterwards, against the full model's time on the item


class Scorer:
    """Scores an item under a sub-model after a context, prefilling each (sub-model, context) once: the baselines
    and the uncompressed prompts share the task's context across items, as a served app's fixed prompt would. A
    request's time is still its whole cost: the context's prefill time plus its own question and choices."""

    def __init__(self, runtime: ElasticRuntime, own: OwnModelBaselines) -> None:
        self.runtime, self.tokenizer, self.own = runtime, runtime.tokenizer, own
        self.model, self.scores = runtime.elastic.loaded.model, runtime.elastic.artifact.scores
        self._kv: dict = {}
        self._memo: dict = {}
        self._shared = ""

    def start_task(self, context: str) -> None:
        """Keep prefilled KV only for this task's own context (a compressed one is used by one item)."""
        self._kv.clear()
        self._shared = context

    def _sub_model(self, setting: str) -> tuple[Transformer, ModelWidths | None, ModelLora | None]:
        if setting.startswith("m"):
            sub = self.runtime.sub_model(round(float(setting[1:].split(",")[0]) * 10))
            return self.model, sub.widths, sub.lora
        method, ratio = setting.split("@")
        r10 = round(float(ratio) * 10)
        if method == "laco":
            return self.own.laco(r10), None, None
        if method == "lingua2":
            return self.own.sparse(r10), None, None
        return self.model, baseline_widths(self.model, self.scores, method, float(ratio)), None

    @torch.no_grad()
    def run(self, item: MCItem, context: str, setting: str) -> tuple[bool, float]:
        kv_key = (setting, hashlib.sha1(context.encode()).hexdigest())
        if (item.key, kv_key) in self._memo:
            correct, choices_s, prefill_s = self._memo[(item.key, kv_key)]
            return correct, prefill_s + choices_s
        model, widths, lora = self._sub_model(setting)
        if kv_key not in self._kv:
            t0 = time.perf_counter()
            entry = (prefill_context(model, self.tokenizer, context, widths, lora), time.perf_counter() - t0)
            if context != self._shared:
                return self._choices(item, kv_key, *entry, model, widths, lora)
            self._kv[kv_key] = entry
        return self._choices(item, kv_key, *self._kv[kv_key], model, widths, lora)

    def _choices(self, item: MCItem, kv_key: tuple, cache: DenseKVCache, prefill_s: float, model: Transformer,
                 widths: ModelWidths | None, lora: ModelLora | None) -> tuple[bool, float]:
        t0 = time.perf_counter()
        scores = choice_scores(model, cache, self.tokenizer.encode(item.question or " ", add_bos=False),
                               [self.tokenizer.encode(c, add_bos=False) for c in item.choices], widths, lora)
        correct, choices_s = max(range(len(scores)), key=scores.__getitem__) == item.answer, time.perf_counter() - t0
        self._memo[(item.key, kv_key)] = (correct, choices_s, prefill_s)
        return correct, prefill_s + choices_s


def _setting(c: Config) -> str:
    return f"m{c.m / 10:.1f},p{c.p / 10:.1f}"


def baseline_fractions(runtime: ElasticRuntime, own: OwnModelBaselines, runs: int,
                       tokens: int = 256) -> dict[str, tuple[float, float]]:
    """(TTFT fraction, TPOT fraction) of the full model for each layer baseline at each ratio, measured here in
    rounds: each round times the full model and every setting once (one prefill of `tokens`, the median of 8 decode
    steps), and a fraction is the median over rounds of the setting over the median of the full model. Measured
    one setting after another, a slow spell during the full model's runs made every setting look faster than it
    was (level-0.9 layer baselines at 0.74 of the full TTFT in one run, 1.06 in the next). At ratio 1.0 a baseline
    removes nothing: it is the full model, its fractions 1.0 by definition (measured, noise put them over a full
    SLO's budget)."""
    model, scores = runtime.elastic.loaded.model, runtime.elastic.artifact.scores
    settings: dict[str, tuple[Transformer, ModelWidths | None]] = {"full": (model, None)}
    for method in LAYER_BASELINES:
        for r in MODEL_LEVELS[:-1]:
            settings[f"{method}@{r / 10:.1f}"] = ((own.laco(r), None) if method == "laco"
                                                  else (model, baseline_widths(model, scores, method, r / 10)))
    times = in_rounds({key: (lambda m=m, w=w: (ttft_once_s(m, w, None, tokens), tpot_s(m, w, None, 8)))
                       for key, (m, w) in settings.items()}, runs)
    full = [statistics.median(t[i] for t in times["full"]) for i in (0, 1)]
    out = {f"{method}@1.0": (1.0, 1.0) for method in LAYER_BASELINES}
    for key, ts in times.items():
        if key != "full":
            out[key] = (statistics.median(t[0] for t in ts) / full[0], statistics.median(t[1] for t in ts) / full[1])
    return out


class Systems:
    """Each system's config for one item under one SLO in one mode, and running it."""

    def __init__(self, runtime: ElasticRuntime, scorer: Scorer, fractions: dict[str, tuple[float, float]]) -> None:
        self.rt, self.scorer, self.fractions = runtime, scorer, fractions

    def run(self, system: str, mode: str, task: MCTask, item: MCItem, slo: Slo) -> Outcome:
        rt, table = self.rt, self.rt.table
        lc = rt.count_tokens(task.context)
        lq = rt.choice_query_tokens(item.question, list(item.choices))
        full = (table.ttft_s(10, lc + lq), table.tpot_s(10))
        budgets = (slo.prefill / 10 * full[0], slo.decode / 10 * full[1])
        if system == "full":
            return self._score(item, task.context, _setting(Config(10, 10)), 0.0)
        if system == "llmpruner":
            if mode == "proxy":
                c = llmpruner_config(slo)
            else:
                fits = [m for m in MODEL_LEVELS if table.ttft_s(m, lc + lq) <= budgets[0]
                        and table.tpot_s(m) <= budgets[1]]
                c = Config(max(fits) if fits else MODEL_LEVELS[0], 10)
            return self._score(item, task.context, _setting(c), 0.0)
        if system == "lingua2_contextual":  # the same rule in both modes: prompt rate s_pre, FFN keep s_dec
            t0 = time.perf_counter()
            context = self.scorer.own.lingua2_prompt(rt, task.context, mc_query_text(item.question,
                                                                                     list(item.choices)), slo)
            compressed_s = time.perf_counter() - t0
            return self._score(item, context, f"lingua2@{slo.decode / 10:.1f}",
                               compressed_s if mode == "measured" else 0.0)
        if system in LAYER_BASELINES:
            if mode == "proxy":
                r = baseline_ratio(slo)
            else:
                fraction = {m: self.fractions[f"{system}@{m / 10:.1f}"] for m in MODEL_LEVELS}
                fits = [m for m, (ttft, tpot) in fraction.items()
                        if ttft <= slo.prefill / 10 and tpot <= slo.decode / 10]
                r = max(fits) if fits else MODEL_LEVELS[0]
            return self._score(item, task.context, f"{system}@{r / 10:.1f}", 0.0)
        # ElastiLM: the runtime's own plan (one tiny-LM pass, the mode's feasibility, repair, compression)
        t0 = time.perf_counter()
        plan = rt.plan(task.context, mc_query_text(item.question, list(item.choices)), lq,
                       SloRequest(slo.prefill / 10, slo.decode / 10), proxy=mode == "proxy", refuse=False)
        planned_s = time.perf_counter() - t0
        return self._score(item, plan.compressed.text, _setting(plan.config), planned_s if mode == "measured" else 0)

    def _score(self, item: MCItem, context: str, setting: str, before_s: float) -> Outcome:
        correct, score_s = self.scorer.run(item, context, setting)
        return Outcome(correct, before_s + score_s, setting)


def load_tasks(cfg: BenchConfig, log: Callable[[str], object]) -> tuple[list[MCTask], dict[str, str]]:
    tasks, unavailable = [], {}
    for name in cfg.datasets:
        make = STANDALONE.get(name) or AGENT.get(name)
        if make is None:
            unavailable[name] = "not in ../shared/data"
            continue
        try:
            tasks.append(make(cfg.items))
        except FileNotFoundError as exc:
            unavailable[name] = str(exc)
    for _, name in TRACE_CLASSES:
        if name not in STANDALONE and name not in AGENT:
            unavailable[name] = "not in ../shared/data"
    log(f"datasets: {', '.join(f'{t.name} ({len(t.items)} items)' for t in tasks)}; unavailable: "
        f"{', '.join(unavailable) or 'none'}")
    return tasks, unavailable


def evaluate(systems: Systems, tasks: list[MCTask], log: Callable[[str], object]) -> dict:
    """results[mode][system][slo][task] = [Outcome per item]; the full model's outcome per item sets the budgets."""
    slos = [Slo(*s) for s in STANDALONE_SLOS]
    total = sum(len(t.items) for t in tasks) * len(slos) * len(MODES)
    results: dict = {mode: {s: {k: {} for k in slos} for s in SYSTEMS} for mode in MODES}
    started, done = time.perf_counter(), 0
    for task in tasks:
        systems.scorer.start_task(task.context)
        for i, item in enumerate(task.items):
            for mode in MODES:
                for slo in slos:
                    for system in ("full", *SYSTEMS[:-1]):  # the reference first: no warm-cache edge
                        results[mode][system][slo].setdefault(task.name, []).append(
                            systems.run(system, mode, task, item, slo))
                    done += 1
            if (i + 1) % 10 == 0 or i + 1 == len(task.items):
                el = time.perf_counter() - started
                log(f"  {task.name}: {i + 1}/{len(task.items)} items; {done}/{total} (item, SLO, mode) done, "
                    f"{el:.0f} s, ETA {el / done * (total - done):.0f} s")
    for mode in MODES:
        for slo in slos:
            for task in tasks:
                full = results[mode]["full"][slo][task.name]
                for system in SYSTEMS:
                    rows = results[mode][system][slo][task.name]
                    results[mode][system][slo][task.name] = [
                        Outcome(o.correct, o.time_s, o.setting, o.time_s <= slo.prefill / 10 * f.time_s)
                        for o, f in zip(rows, full, strict=True)]
    return results


def trace_counts(alpha: float) -> list[int]:
    """§9: class i (1..6) gets floor(600 e^{alpha i} / sum_j e^{alpha j}) requests."""
    weights = [math.exp(alpha * i) for i in range(1, 7)]
    return [math.floor(TRACE_SIZE * w / sum(weights)) for w in weights]


def traces(results: dict, tasks: list[MCTask], seed: int) -> dict:
    """Per mode, system and alpha: the accuracy over the trace's requests (items drawn without replacement from the
    evaluated ones, counts scaled down uniformly when a class has fewer items than the trace asks)."""
    by_name = {t.name: t for t in tasks}
    classes = [(Slo(*s), name) for s, name in TRACE_CLASSES if name in by_name]
    out: dict = {"classes": [f"{s.prefill / 10:.1f},{s.decode / 10:.1f}:{n}" for s, n in classes], "alphas": {}}
    for alpha in ALPHAS:
        counts = [c for c, (_, name) in zip(trace_counts(alpha), TRACE_CLASSES, strict=True) if name in by_name]
        scale = min(1.0, *(len(by_name[n].items) / c for c, (_, n) in zip(counts, classes, strict=True)))
        rng = random.Random(f"{seed}/{alpha}")
        picks = [(slo, name, rng.sample(range(len(by_name[name].items)), int(c * scale)))
                 for c, (slo, name) in zip(counts, classes, strict=True)]
        entry: dict = {"requests": sum(len(p) for *_, p in picks), "scale": scale, "systems": {}}
        for mode in MODES:
            for system in SYSTEMS:
                ok = [results[mode][system][slo][name][i].correct for slo, name, idx in picks for i in idx]
                k = sum(ok)
                entry["systems"].setdefault(mode, {})[system] = {"accuracy": k / max(1, len(ok)),
                                                                 "ci": wilson(k, len(ok))}
        out["alphas"][str(alpha)] = entry
    return out


def summarize(results: dict, tasks: list[MCTask], cfg: BenchConfig, trace: dict) -> dict:
    slos = [Slo(*s) for s in STANDALONE_SLOS]
    out: dict = {}
    for mode in MODES:
        systems: dict = {}
        for system in SYSTEMS:
            by_slo, met = {}, []
            for slo in slos:
                rows = [o for t in tasks for o in results[mode][system][slo][t.name]]
                k = sum(o.correct for o in rows)
                settings: dict[str, int] = {}
                for o in rows:
                    settings[o.setting] = settings.get(o.setting, 0) + 1
                entry = {"accuracy": k / len(rows), "ci": wilson(k, len(rows)), "n": len(rows),
                         "per_task": {t.name: statistics.mean(o.correct for o in results[mode][system][slo][t.name])
                                      for t in tasks}, "settings": settings}
                if mode == "measured":
                    entry["slo_attainment"] = statistics.mean(bool(o.met) for o in rows)
                    entry["median_time_s"] = statistics.median(o.time_s for o in rows)
                    met += [bool(o.met) for o in rows] if slo != Slo(10, 10) else []
                by_slo[f"{slo.prefill / 10:.1f},{slo.decode / 10:.1f}"] = entry
            systems[system] = {"by_slo": by_slo, "trace_accuracy": {a: trace["alphas"][a]["systems"][mode][system]
                                                                    ["accuracy"] for a in trace["alphas"]}}
            if mode == "measured":
                systems[system]["slo_attainment"] = statistics.mean(met) if met else None
        for system in SYSTEMS:
            if system == "elastilm":
                continue
            diffs = {}
            for slo in slos:
                a = {t.name: [o.correct for o in results[mode]["elastilm"][slo][t.name]] for t in tasks}
                b = {t.name: [o.correct for o in results[mode][system][slo][t.name]] for t in tasks}
                point, lo, hi = paired_bootstrap([(a, b)], cfg.bootstrap, cfg.seed)
                diffs[f"{slo.prefill / 10:.1f},{slo.decode / 10:.1f}"] = {"diff": point, "ci": [lo, hi],
                                                                         "significant": not lo <= 0 <= hi}
            systems[system]["elastilm_minus"] = diffs
        out[mode] = systems
    return out


def table(result: dict) -> str:
    lines = []
    for mode in MODES:
        systems = result["modes"][mode]
        pairs = list(systems["full"]["by_slo"])
        lines.append(f"\n{mode} mode: accuracy per SLO pair (prefill,decode), pooled over "
                     f"{', '.join(result['datasets'])}" + ("; [SLO attainment]" if mode == "measured" else ""))
        lines.append(f"{'system':<20}" + "".join(f"{p:>16}" for p in pairs) + "".join(
            f"{'trace a=' + a:>14}" for a in systems["full"]["trace_accuracy"]))
        for name, s in systems.items():
            cells = []
            for p in pairs:
                e = s["by_slo"][p]
                cells.append(f"{e['accuracy']:.3f}" + (f" [{e['slo_attainment']:.2f}]" if mode == "measured" else ""))
            lines.append(f"{name:<20}" + "".join(f"{c:>16}" for c in cells)
                         + "".join(f"{v:>14.3f}" for v in s["trace_accuracy"].values()))
    lines.append(f"\ntiny LM time / full model's time to answer (median): {result['tlm_ttft_fraction']:.3f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    systems = result["modes"]["measured"]
    pairs = list(systems["full"]["by_slo"])
    width = 0.8 / len(systems)
    for k, (name, s) in enumerate(systems.items()):
        acc = [s["by_slo"][p]["accuracy"] for p in pairs]
        err = [[a - s["by_slo"][p]["ci"][0] for a, p in zip(acc, pairs, strict=True)],
               [s["by_slo"][p]["ci"][1] - a for a, p in zip(acc, pairs, strict=True)]]
        axes[0].bar([i + k * width for i in range(len(pairs))], acc, width, yerr=err, label=name, capsize=2)
        cells = [result["trace"]["alphas"][a]["systems"]["measured"][name] for a in s["trace_accuracy"]]
        tr = [c["accuracy"] for c in cells]
        err = [[c["accuracy"] - c["ci"][0] for c in cells], [c["ci"][1] - c["accuracy"] for c in cells]]
        axes[1].bar([i + k * width for i in range(len(tr))], tr, width, yerr=err, label=name, capsize=2)
    axes[0].set_xticks([i + 0.4 for i in range(len(pairs))], pairs)
    axes[0].set(title="measured mode: accuracy per SLO (prefill, decode), 95% Wilson", ylabel="accuracy")
    alphas = list(systems["full"]["trace_accuracy"])
    axes[1].set_xticks([i + 0.4 for i in range(len(alphas))], [f"alpha={a}" for a in alphas])
    axes[1].set(title="end-to-end trace accuracy (measured mode), 95% Wilson")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


def run(cfg: BenchConfig, out: Path, elastic_dir: Path | None, log: Callable[[str], object] = print) -> dict:
    started = time.perf_counter()
    loaded = load_model()
    from llmaas.elastic.artifact import elastic_dir as default_dir
    runtime = ElasticRuntime.open(loaded, elastic_dir or default_dir(loaded.model_id))
    tasks, unavailable = load_tasks(cfg, log)
    own = OwnModelBaselines.open(runtime.elastic.directory, log)
    log(f"measuring the layer baselines' latency fractions ({cfg.latency_runs} rounds after a warm-up, ~1 min)...")
    fractions = baseline_fractions(runtime, own, cfg.latency_runs)
    systems = Systems(runtime, Scorer(runtime, own), fractions)
    results = evaluate(systems, tasks, log)
    trace = traces(results, tasks, cfg.seed)
    full_times = [o.time_s for t in tasks for o in results["measured"]["full"][Slo(10, 10)][t.name]]
    tlm_times = []  # the tiny LM alone, on the first items: its share of the time to answer
    for t in tasks[:2]:
        for item in t.items[:10]:
            t0 = time.perf_counter()
            run_dual_head(runtime.tlm, runtime.tok, 10, 10, t.context, mc_query_text(item.question, list(item.choices)))
            tlm_times.append(time.perf_counter() - t0)
    modes = summarize(results, tasks, cfg, trace)
    result = {"mode": "measured", "machine": machine(), "config": cfg.__dict__ | {"datasets": list(cfg.datasets)},
              "datasets": [t.name for t in tasks], "unavailable": unavailable, "not_applicable": NOT_APPLICABLE,
              "systems": modes["measured"], "modes": modes, "trace": trace,
              "tlm_ttft_fraction": statistics.median(tlm_times) / statistics.median(full_times),
              "tlm_s_median": statistics.median(tlm_times), "full_time_s_median": statistics.median(full_times),
              "baseline_fractions": fractions, "heads": heads_record(default_heads_path(runtime.elastic.directory)),
              "wall_s": time.perf_counter() - started}
    write_json(result, out / "bench_elastic.json")
    plot(result, out / "bench_elastic.png")
    print(table(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas bench elastic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 items per dataset, no LlamaTouch (about 15 min here)")
    p.add_argument("--items", type=int, help=f"items per dataset (default {BenchConfig.items})")
    p.add_argument("--datasets", help="comma-separated (default: " + ",".join(BenchConfig.datasets) + ")")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--elastic-dir", type=Path, help="elastic artifacts (default: the model's cache directory)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = BenchConfig()
    if args.quick:
        cfg = BenchConfig(items=20, datasets=("arc_easy", "openbookqa", "sciq", "mmlu", "octopus"))
    if args.items:
        cfg = BenchConfig(items=args.items, datasets=cfg.datasets)
    if args.datasets:
        cfg = BenchConfig(items=cfg.items, datasets=tuple(d.strip() for d in args.datasets.split(",") if d.strip()))
    torch.manual_seed(cfg.seed)
    run(cfg, args.out, args.elastic_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
