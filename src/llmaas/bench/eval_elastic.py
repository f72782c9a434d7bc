"""`llmaas eval elastic`: accuracy, perplexity and measured latency of every elastic level (with and without its
LoRA) and of the layer-dropping baselines, compared at matched measured TTFT.

Owns the run plan, the result cache (perplexity and latency per setting, scores per item under a content hash: a
long run resumes, a larger run scores only new items, and accuracy can run while the machine is busy while latency
waits for a quiet one: `--phase`), statistics (Wilson 95% intervals; paired bootstrap of the mean accuracy across
tasks), the matched comparisons (nearest TTFT; TTFT budgets), the JSON, the table and the PNG.
Ignores how sub-models are made (llmaas.elastic) and how items are scored (mc_score.py).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from llmaas.bench.mc_score import perplexity, score_task
from llmaas.bench.mc_tasks import AGENT, STANDALONE, MCTask
from llmaas.bench.plotting import pyplot
from llmaas.elastic.baselines import BASELINES, baseline_widths
from llmaas.elastic.latency import switch_s, tpot_s, ttft_s
from llmaas.elastic.model import ElasticModel
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.model.lora import ModelLora
from llmaas.model.widths import ModelWidths
from llmaas.paths import SHARED_DATA_DIR

WIKITEXT = SHARED_DATA_DIR / "wikitext2" / "test.raw.txt"
ITEM_PROTOCOL = "meanlogp-shared-context"  # how an item is scored (mc_score.py): a new protocol is a new cache key
Log = Callable[[str], object]  # where progress lines go (print by default)
Phase = Literal["all", "accuracy", "latency"]
Correct = dict[str, list[bool]]  # task -> per item: answered right


@dataclass(frozen=True)
class EvalElasticConfig:
    """The evaluation's sizes: items per task, perplexity windows, the latency protocol, baselines and TTFT SLOs."""

    items: int = 300  # per standalone task (the spec asks for at least 300)
    agent_items: int = 178  # per agent task (all of Octopus; LlamaTouch has 490 at 77 choices each: costly)
    ppl_windows: int = 4
    ppl_window_tokens: int = 512
    ttft_tokens: int = 256
    latency_runs: int = 11  # interleaved rounds: the matching moves with TTFT noise, so more than the profile's 5
    baseline_ratios: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    budget_fractions: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # TTFT SLOs, of the full model's TTFT
    bootstrap: int = 10_000

    def keys(self) -> dict[str, str]:
        """What the cached results of each kind depend on. Items are cached one by one under their content hash, so
        a run with more items scores only the new ones."""
        return {"ppl": f"ppl{self.ppl_windows}x{self.ppl_window_tokens}", "items": ITEM_PROTOCOL,
                "latency": f"ttft{self.ttft_tokens}-served-rounds{self.latency_runs}"}


@dataclass(frozen=True)
class Setting:
    """One evaluated sub-model: an elastic level (with or without its LoRA) or a baseline at a keep ratio."""

    method: str  # "elastic" or a baseline name
    ratio: float  # level or ratio
    lora: bool = False
    adapter_steps: int = 0  # the adapter's training steps: a retrained adapter is a new setting, not a cache hit

    @property
    def name(self) -> str:
        """The cache and report key, e.g. `elastic@0.5+lora120` or `layer_reduction@0.7`."""
        return f"{self.method}@{self.ratio:.1f}" + (f"+lora{self.adapter_steps}" if self.lora else "")


Timed = tuple[float, Correct, Setting]  # (measured TTFT in s, correctness per task, the setting)


def plan(elastic: ElasticModel, cfg: EvalElasticConfig) -> list[Setting]:
    """Every setting to evaluate: the levels with their LoRA, the baselines, then the levels without LoRA."""
    # What the matched comparison needs comes first, so a run stopped part-way has answered it.
    out = [lora_setting(elastic, m) for m in MODEL_LEVELS if m in elastic.adapters]
    out += [Setting(b, r) for b in BASELINES for r in cfg.baseline_ratios]
    return out + [Setting("elastic", m / 10) for m in MODEL_LEVELS]


def lora_setting(elastic: ElasticModel, level10: int) -> Setting:
    """The setting of a level (in tenths) with its trained adapter, keyed by the adapter's training steps."""
    return Setting("elastic", level10 / 10, True, elastic.adapter_records[level10]["steps"])


def sub_model(elastic: ElasticModel, s: Setting) -> tuple[ModelWidths, ModelLora | None]:
    """The (widths, LoRA or None) that run a setting on the elastic model's weights."""
    if s.method == "elastic":
        sub = elastic.view(round(s.ratio * 10), s.lora)
        return sub.widths, sub.lora
    return baseline_widths(elastic.loaded.model, elastic.artifact.scores, s.method, s.ratio), None


class ResultCache:
    """JSON file of finished settings; written after each one so an interrupted run loses at most one setting."""

    def __init__(self, path: Path, keys: dict[str, str]) -> None:
        self.path, self.keys = path, keys
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, kind: str, name: str) -> dict | None:
        """The cached result of one kind (ppl, items, latency) for a setting name, or None if not there yet."""
        return self.data.get(f"{kind}|{self.keys[kind]}|{name}")

    def put(self, kind: str, name: str, value: dict) -> None:
        """Store a result and rewrite the file atomically."""
        self.data[f"{kind}|{self.keys[kind]}|{name}"] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of k successes in n trials ((0, 1) when n is 0)."""
    if n == 0:
        return (0.0, 1.0)
    z, p = 1.96, k / n
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def paired_bootstrap(pairs: list[tuple[Correct, Correct]], resamples: int,
                     seed: int = 42) -> tuple[float, float, float]:
    """Mean-across-tasks accuracy of a minus b, averaged over `pairs` (one pair: a plain paired comparison; several:
    a pooled one), with a 95% interval from resampling each task's items. Every setting scores the same items, so
    the pairs share one resample of item indices; the statistic is linear, so it is the bootstrap of the per-item
    difference averaged over pairs."""
    gen = torch.Generator().manual_seed(seed)
    tasks = sorted(pairs[0][0])
    point, samples = 0.0, torch.zeros(resamples, dtype=torch.float64)
    for t in tasks:
        d = torch.stack([torch.tensor(a[t], dtype=torch.float64) - torch.tensor(b[t], dtype=torch.float64)
                         for a, b in pairs]).mean(0)
        point += float(d.mean()) / len(tasks)
        samples += d[torch.randint(len(d), (resamples, len(d)), generator=gen)].mean(1) / len(tasks)
    samples = samples.sort().values
    return point, float(samples[int(0.025 * resamples)]), float(samples[int(0.975 * resamples) - 1])


def accuracy(cache: ResultCache, s: Setting, tasks: list[MCTask]) -> dict | None:
    """{"ppl", "correct": {task: [bool per item]}} of a setting, or None while any part is unscored."""
    ppl, scored = cache.get("ppl", s.name), cache.get("items", s.name) or {}
    correct: Correct = {}
    for t in tasks:
        done = scored.get(t.name, {})
        if any(i.key not in done for i in t.items):
            return None
        correct[t.name] = [done[i.key] for i in t.items]
    return {"ppl": ppl["ppl"], "correct": correct} if ppl is not None else None


def run_accuracy(elastic: ElasticModel, settings: list[Setting], tasks: list[MCTask], wiki: list[int],
                 cfg: EvalElasticConfig, cache: ResultCache, log: Log = print) -> None:
    """Perplexity and the items not yet scored, setting by setting (cached after each)."""
    todo = [s for s in settings if accuracy(cache, s, tasks) is None]
    t0 = time.perf_counter()
    for k, s in enumerate(todo):
        widths, lora = sub_model(elastic, s)
        model = elastic.loaded.model
        if cache.get("ppl", s.name) is None:
            cache.put("ppl", s.name, {"ppl": perplexity(model, wiki, cfg.ppl_windows, cfg.ppl_window_tokens, widths,
                                                        lora)})
        scored = cache.get("items", s.name) or {}
        for t in tasks:
            done = scored.setdefault(t.name, {})
            new = tuple(i for i in t.items if i.key not in done)
            if new:
                done.update(zip((i.key for i in new), score_task(model, elastic.loaded.tokenizer,
                                                                 replace(t, items=new), widths, lora), strict=True))
        cache.put("items", s.name, scored)
        result = accuracy(cache, s, tasks)
        assert result is not None, "every part of the setting was just scored"
        elapsed = time.perf_counter() - t0
        acc = sum(sum(v) / len(v) for v in result["correct"].values()) / len(tasks)
        log(f"  [{k + 1}/{len(todo)}] {s.name}: ppl {result['ppl']:.2f}, mean accuracy {acc:.3f}; "
            f"{elapsed:.0f} s, ETA {elapsed / (k + 1) * (len(todo) - k - 1):.0f} s")


def run_latency(elastic: ElasticModel, settings: list[Setting], cfg: EvalElasticConfig, cache: ResultCache,
                log: Log = print) -> None:
    """TTFT and TPOT of every setting not yet timed, measured in interleaved rounds (one run of each setting per
    round, median over rounds) so that the machine's drift lands on every setting alike."""
    todo = [s for s in settings if cache.get("latency", s.name) is None]
    subs = {s.name: sub_model(elastic, s) for s in todo}
    model = elastic.loaded.model
    ttft: dict[str, list[float]] = {s.name: [] for s in todo}
    tpot: dict[str, list[float]] = {s.name: [] for s in todo}
    for r in range(cfg.latency_runs):
        for s in todo:
            widths, lora = subs[s.name]
            ttft[s.name].append(ttft_s(model, widths, lora, cfg.ttft_tokens, 1))
            tpot[s.name].append(tpot_s(model, widths, lora, 8))
        log(f"  latency round {r + 1}/{cfg.latency_runs} over {len(todo)} settings")
    for s in todo:
        value = {"ttft_s": statistics.median(ttft[s.name]), "tpot_s": statistics.median(tpot[s.name]),
                 "ttft_tokens": cfg.ttft_tokens, "rounds": cfg.latency_runs}
        cache.put("latency", s.name, value)


def assemble(elastic: ElasticModel, settings: list[Setting], tasks: list[MCTask], cfg: EvalElasticConfig,
             cache: ResultCache) -> dict:
    """The result document from the cache: levels, baselines, matched comparisons, switch time, adapter bytes, tasks,
    config, anchors and LoRA training records (the shape `llmaas eval elastic --help` states)."""
    def entry(s: Setting) -> dict:
        acc, lat = accuracy(cache, s, tasks), cache.get("latency", s.name) or {}
        out: dict[str, Any] = {"ttft_s": lat.get("ttft_s"), "tpot_s": lat.get("tpot_s")}
        if acc is not None:
            out["ppl"] = acc["ppl"]
            out["accuracy"] = {t: sum(v) / len(v) for t, v in acc["correct"].items()}
            out["accuracy_ci95"] = {t: wilson(sum(v), len(v)) for t, v in acc["correct"].items()}
            out["mean_accuracy"] = sum(out["accuracy"].values()) / len(out["accuracy"])
        return out

    levels = {}
    for m in MODEL_LEVELS:
        base = entry(Setting("elastic", m / 10))
        lora = entry(lora_setting(elastic, m)) if m in elastic.adapters else {}
        levels[model_level_name(m)] = {**base, "ppl_lora": lora.get("ppl"), "accuracy_lora": lora.get("accuracy"),
                                 "accuracy_lora_ci95": lora.get("accuracy_ci95"),
                                 "mean_accuracy_lora": lora.get("mean_accuracy"), "ttft_lora_s": lora.get("ttft_s"),
                                 "tpot_lora_s": lora.get("tpot_s")}
    baselines = {b: {f"{r:.1f}": entry(Setting(b, r)) for r in cfg.baseline_ratios} for b in BASELINES}
    return {"levels": levels, "baselines": baselines, "matched": _matched(elastic, cfg, cache, tasks),
            "switch_s": switch_s(elastic.view), "lora_bytes": elastic.adapters_nbytes,
            "model_bytes": elastic.loaded.model.weights.nbytes,
            "tasks": {t.name: {"items": len(t.items), "chance": t.chance} for t in tasks},
            "config": asdict(cfg), "anchors": list(elastic.artifact.anchors),
            "lora_training": {model_level_name(m): {k: r.get(k) for k in _RECORD_KEYS}
                              for m, r in elastic.adapter_records.items()}}


_RECORD_KEYS = ("steps", "complete", "tokens_seen", "wall_s", "held_out_loss_without_lora", "held_out_loss_best")


def _matched(elastic: ElasticModel, cfg: EvalElasticConfig, cache: ResultCache, tasks: list[MCTask]) -> dict:
    """Elastic (each level with its LoRA where trained) against each baseline at equal measured TTFT, two ways, each
    as mean-accuracy differences with paired bootstrap 95% intervals, per comparison and pooled per baseline and over
    all baselines (the curve-level question: at equal TTFT, is elastic more accurate?):
    - pairs: each level against the baseline setting of nearest TTFT;
    - budgets: the spec's measured mode (§9): for a TTFT SLO of a fraction of the full model's, each system takes
      the largest setting whose measured TTFT meets it; a baseline with none that does misses the SLO."""
    def timed(s: Setting) -> Timed | None:
        acc, lat = accuracy(cache, s, tasks), cache.get("latency", s.name)
        return (lat["ttft_s"], acc["correct"], s) if acc is not None and lat is not None else None

    mine = [t for m in MODEL_LEVELS[:-1] if (t := timed(lora_setting(elastic, m) if m in elastic.adapters
                                                  else Setting("elastic", m / 10))) is not None]
    theirs = {b: [t for r in cfg.baseline_ratios if (t := timed(Setting(b, r))) is not None] for b in BASELINES}

    def compare(a: Timed, b: Timed, **about: object) -> dict:
        d, lo, hi = paired_bootstrap([(a[1], b[1])], cfg.bootstrap)
        return {**about, "lora": a[2].lora, "ttft_s": a[0], "baseline": b[2].method, "ratio": b[2].ratio,
                "baseline_ttft_s": b[0], "diff": d, "ci95": [lo, hi], "significant": lo > 0 or hi < 0,
                "_correct": (a[1], b[1])}

    pairs = [compare(a, min(options, key=lambda t: abs(t[0] - a[0])), level=model_level_name(round(a[2].ratio * 10)))
             for a in mine for options in theirs.values() if options]
    budgets, misses = [], []
    full = cache.get("latency", Setting("elastic", 1.0).name) or {}
    for fraction in cfg.budget_fractions if full else ():
        budget = fraction * full["ttft_s"]
        a = largest_meeting(mine, budget)
        for b, options in theirs.items():
            other = largest_meeting(options, budget)
            if a is not None and other is not None:
                budgets.append(compare(a, other, fraction=fraction, budget_s=budget,
                                       level=model_level_name(round(a[2].ratio * 10))))
            else:
                misses.append({"fraction": fraction, "budget_s": budget, "baseline": b,
                               "elastic_meets": a is not None, "baseline_meets": other is not None})
    return {"pairs": _strip(pairs), "pooled": _pooled(pairs, cfg), "budgets": _strip(budgets),
            "budgets_pooled": _pooled(budgets, cfg), "budget_misses": misses}


def largest_meeting(options: list[Timed], budget_s: float) -> Timed | None:
    """The (ttft_s, correct, setting) of the largest setting whose measured TTFT meets the budget (by the setting's
    own size, not its TTFT: noise may time a larger setting faster), or None when none does."""
    return max((t for t in options if t[0] <= budget_s), key=lambda t: t[2].ratio, default=None)


def _pooled(rows: list[dict], cfg: EvalElasticConfig) -> dict:
    pooled = {}
    for b in [*BASELINES, "all"]:
        chosen = [r["_correct"] for r in rows if b in (r["baseline"], "all")]
        if chosen:
            d, lo, hi = paired_bootstrap(chosen, cfg.bootstrap)
            pooled[b] = {"pairs": len(chosen), "diff": d, "ci95": [lo, hi], "significant": lo > 0 or hi < 0}
    return pooled


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "_correct"} for r in rows]


def table(result: dict) -> str:
    """The result as text: one row per setting (TTFT, TPOT, ppl, accuracies), then the matched comparisons."""
    tasks = list(result["tasks"])
    head = f"{'setting':<22}{'TTFT ms':>9}{'TPOT ms':>9}{'ppl':>9}{'mean acc':>10}  " + " ".join(
        f"{t[:8]:>8}" for t in tasks)
    lines = [head, "-" * len(head)]

    def f(x: float | None, k: int, d: int) -> str:
        return f"{x:>{k}.{d}f}" if x is not None else f"{'-':>{k}}"

    def row(name: str, ttft: float | None, tpot: float | None, ppl: float | None, acc: dict | None) -> str:
        mean = sum(acc.values()) / len(acc) if acc else None
        return (f"{name:<22}{f(ttft and ttft * 1e3, 9, 1)}{f(tpot and tpot * 1e3, 9, 2)}{f(ppl, 9, 2)}"
                f"{f(mean, 10, 3)}  " + " ".join(f((acc or {}).get(t), 8, 3) for t in tasks))

    for name, v in result["levels"].items():
        lines.append(row(f"elastic {name}", v["ttft_s"], v["tpot_s"], v.get("ppl"), v.get("accuracy")))
        if v.get("accuracy_lora"):
            lines.append(row(f"elastic {name} +LoRA", v["ttft_lora_s"], v["tpot_lora_s"], v["ppl_lora"],
                             v["accuracy_lora"]))
    for b, rs in result["baselines"].items():
        for r, v in rs.items():
            lines.append(row(f"{b} {r}", v["ttft_s"], v["tpot_s"], v.get("ppl"), v.get("accuracy")))
    lines.append("")
    lines.append("matched TTFT (elastic level vs nearest-TTFT baseline): mean-accuracy difference, 95% CI")
    for mt in result["matched"]["pairs"]:
        lines.append(f"  {mt['level']}{'+LoRA' if mt['lora'] else ''} vs {mt['baseline']} {mt['ratio']:.1f} "
                     f"(TTFT {mt['ttft_s'] * 1e3:.0f} vs {mt['baseline_ttft_s'] * 1e3:.0f} ms): {_diff(mt)}")
    for b, pl in result["matched"]["pooled"].items():
        lines.append(f"  pooled over {pl['pairs']} pairs vs {b}: {_diff(pl)}")
    lines.append("TTFT budgets (each system's largest setting that meets the SLO): mean-accuracy difference, 95% CI")
    for mt in result["matched"]["budgets"]:
        lines.append(f"  {mt['fraction']:.1f} x full ({mt['budget_s'] * 1e3:.0f} ms): {mt['level']}"
                     f"{'+LoRA' if mt['lora'] else ''} ({mt['ttft_s'] * 1e3:.0f} ms) vs {mt['baseline']} "
                     f"{mt['ratio']:.1f} ({mt['baseline_ttft_s'] * 1e3:.0f} ms): {_diff(mt)}")
    for ms in result["matched"]["budget_misses"]:
        who = [w for w, met in (("elastic", ms["elastic_meets"]), (ms["baseline"], ms["baseline_meets"])) if not met]
        lines.append(f"  {ms['fraction']:.1f} x full: {' and '.join(who)} cannot meet it")
    for b, pl in result["matched"]["budgets_pooled"].items():
        lines.append(f"  pooled over {pl['pairs']} budgets vs {b}: {_diff(pl)}")
    lines.append(f"switch {result['switch_s'] * 1e6:.2f} us; adapters {result['lora_bytes'] / 2**20:.1f} MiB "
                 f"({result['lora_bytes'] / result['model_bytes']:.1%} of resident weights)")
    return "\n".join(lines)


def _diff(r: dict) -> str:
    return (f"{r['diff']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            + ("" if r["significant"] else " (not significant)"))


def plot(result: dict, path: Path) -> bool:
    """Mean accuracy against measured TTFT per series, written to path; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {"elastic": [(v["ttft_s"], v.get("mean_accuracy")) for v in result["levels"].values()],
              "elastic + LoRA": [(v["ttft_lora_s"], v.get("mean_accuracy_lora")) for v in result["levels"].values()]}
    series |= {b: [(v["ttft_s"], v.get("mean_accuracy")) for v in rs.values()] for b, rs in result["baselines"].items()}
    for name, pts in series.items():
        pts = sorted((t * 1e3, a) for t, a in pts if t is not None and a is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    chance = sum(t["chance"] for t in result["tasks"].values()) / len(result["tasks"])
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xlabel(f"measured TTFT, ms ({result['config']['ttft_tokens']}-token prompt)")
    ax.set_ylabel("mean accuracy over tasks")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(elastic: ElasticModel, cfg: EvalElasticConfig, json_path: Path, png_path: Path | None = None,
        phase: Phase = "all") -> dict:
    """Score and time every setting of the plan (phase: all, accuracy or latency; cached per item), assemble the
    comparison, print its table, and write the JSON and the plot."""
    tasks = [f(cfg.items) for f in STANDALONE.values()] + [f(cfg.agent_items) for f in AGENT.values()]
    settings = plan(elastic, cfg)
    cache = ResultCache(elastic.directory / "eval_cache.json", cfg.keys())
    print(f"{len(settings)} settings x ({len(tasks)} tasks + perplexity); adapters for levels "
          f"{[model_level_name(m) for m in sorted(elastic.adapters)]}")
    if phase in ("all", "accuracy"):
        wiki = elastic.loaded.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:200_000])
        run_accuracy(elastic, settings, tasks, wiki, cfg, cache)
    if phase in ("all", "latency"):
        run_latency(elastic, settings, cfg, cache)
    result = assemble(elastic, settings, tasks, cfg, cache)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print(table(result))
    png = png_path or json_path.with_suffix(".png")
    print(f"wrote {json_path}" + (f" and {png}" if plot(result, png) else ""))
    return result
