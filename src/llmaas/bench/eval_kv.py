"""`llmaas eval kv`: quality of LLMS's tolerance-aware KV compression against static baselines.

Owns the variants (fp16 reference; uniform int8/int4/int2 through the codec; LLMS at ratio_global with the `paper`
and `density_error` objectives), the perplexity harness (segment B of WikiText-2 teacher-forced over the compressed
KV of the preceding segment A, plus next-token KL and top-1 agreement with fp16), the two-call task harness, the
true bytes per token, the table, the JSON and the plot. Each context is computed once at fp16 (densities gathered
on that pass); every variant only swaps in its own encode->decode copy of that KV. Ignores storage and restore.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmaas.bench.kv_tasks import ROW_SEED, TASKS, Item, load_items, score
from llmaas.bench.plotting import pyplot
from llmaas.bench.results import write_json
from llmaas.bench.text_metrics import mean_ci95
from llmaas.engine.conversation import Conversation
from llmaas.engine.generate import GenerateRequest, Generator
from llmaas.kv import codec
from llmaas.kv.chunking import contiguous_spans, cut_chunks, join_chunks
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.memory.kv_levels import assign_levels
from llmaas.model.loader import LoadedModel
from llmaas.model.stats import AttentionStats
from llmaas.model.transformer import Transformer
from llmaas.paths import SHARED_DATA_DIR

VARIANTS = ("fp16", "int8", "int4", "int2", "llms_paper", "llms_error")
UNIFORM = {"fp16": KVLevel.FP16, "int8": KVLevel.INT8, "int4": KVLevel.INT4, "int2": KVLevel.INT2}
OBJECTIVES = {"llms_paper": "paper", "llms_error": "density_error"}
WIKITEXT = SHARED_DATA_DIR / "wikitext2" / "test.raw.txt"
DECODE_COST = 5.0  # one decoded token costs about this many prefill tokens on CPU (ETA weighting only)


@dataclass(frozen=True)
class EvalConfig:
    ratio_global: float = 0.5
    chunk_tokens: int = codec.DEFAULT_CHUNK_TOKENS
    ppl_windows: int = 16
    ppl_context_tokens: int = 1024  # segment A: compressed
    ppl_target_tokens: int = 256  # segment B: scored, its own KV stays fp16
    limit: int = 20  # items per task
    tasks: tuple[str, ...] = tuple(TASKS)

    def __post_init__(self) -> None:
        if not 0.25 <= self.ratio_global <= 1.0:
            raise ValueError(f"ratio_global must be in [0.25, 1]; got {self.ratio_global}")
        if self.ppl_windows < 0 or self.limit < 0 or self.ppl_target_tokens < 2 or self.ppl_context_tokens < 1:
            raise ValueError("windows and limit must be >= 0, segment A >= 1 token and segment B >= 2 tokens")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {', '.join(TASKS)}")


# -- one context's KV at every level -----------------------------------------------------------------------------

def decoded_levels(k: torch.Tensor, v: torch.Tensor, geom: ChunkGeometry,
                   fills: Sequence[int] | None = None) -> dict[KVLevel, tuple[torch.Tensor, torch.Tensor]]:
    """Chunks (k, v) [N, L, Hkv, C, D] as each level decodes them: FP16 as given, INT8 encoded, INT4 and INT2
    requantized from that INT8 encoding (what the store does), all float32 [N, L, Hkv, C, D]."""
    p8 = codec.encode(k, v, KVLevel.INT8, geom, fills)
    by_level = {KVLevel.FP16: (k, v), KVLevel.INT8: codec.decode(p8, KVLevel.INT8, geom)}
    for level in (KVLevel.INT4, KVLevel.INT2):
        by_level[level] = codec.decode(codec.requantize(p8, level, geom, fills), level, geom)
    return by_level


@dataclass
class SegmentKV:
    """A context's KV decoded at each level (every chunk at that level), so a variant is a per-chunk pick: the
    codec works chunk by chunk, so this equals encoding each chunk at its own level."""

    n_tokens: int
    geom: ChunkGeometry
    by_level: dict[KVLevel, tuple[torch.Tensor, torch.Tensor]]  # level -> (k, v) [N, L, Hkv, C, D] float32
    chunk_densities: list[float]  # sealed chunks only

    @property
    def sealed_chunks(self) -> int:
        return self.n_tokens // self.geom.chunk_tokens

    @property
    def num_chunks(self) -> int:
        return -(-self.n_tokens // self.geom.chunk_tokens)

    @classmethod
    def build(cls, kv: Sequence[torch.Tensor], n_tokens: int, token_density: torch.Tensor,
              geom: ChunkGeometry) -> SegmentKV:
        c = geom.chunk_tokens
        k, v = cut_chunks(kv, contiguous_spans(n_tokens, c), c)
        sealed, tail = divmod(n_tokens, c)
        by_level = decoded_levels(k, v, geom, [c] * sealed + ([tail] if tail else []))
        densities = token_density[:sealed * c].view(sealed, c).mean(dim=1).tolist()
        return cls(n_tokens, geom, by_level, densities)

    def levels(self, variant: str, ratio_global: float) -> list[KVLevel]:
        """One level per chunk, the partial tail included (LLMS keeps it INT8: it is the staging buffer)."""
        if variant in UNIFORM:
            return [UNIFORM[variant]] * self.num_chunks
        sealed = assign_levels(self.chunk_densities, [KVLevel.INT8] * self.sealed_chunks, ratio_global,
                               OBJECTIVES[variant], codec.LEVEL_ERROR)
        return sealed + [KVLevel.INT8] * (self.num_chunks - self.sealed_chunks)

    def write(self, levels: Sequence[KVLevel], cache: DenseKVCache) -> None:
        """Put the KV at these per-chunk levels into the cache's first n_tokens slots (rounded to fp16)."""
        k, v = (t.clone() for t in self.by_level[KVLevel.FP16])
        for level in set(levels) - {KVLevel.FP16}:
            idx = torch.tensor([i for i, lv in enumerate(levels) if lv == level])
            k[idx], v[idx] = self.by_level[level][0][idx], self.by_level[level][1][idx]
        x = join_chunks(k, v, self.n_tokens)
        for layer, store in enumerate(cache.kv):
            store[:, :, :self.n_tokens] = x[:, layer]


LevelPolicy = Callable[[SegmentKV], list[KVLevel]]  # a context -> one level per chunk (diagnostics add their own)


def variant_policy(variant: str, ratio_global: float) -> LevelPolicy:
    """The level policy of one of VARIANTS at ratio_global (which only the LLMS variants use)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return lambda ctx: ctx.levels(variant, ratio_global)


def prefill_with_density(model: Transformer, ids: torch.Tensor, cache: DenseKVCache) -> torch.Tensor:
    """Run the context into an empty cache (no LM head) and return each token's density (spec §4.2)."""
    assert cache.num_tokens == 0
    stats = AttentionStats.zeros(ids.numel())
    model.run_layers(model.embed(ids), torch.arange(ids.numel()), cache.append(ids.numel()), stats=stats)
    return stats.density()


# -- bookkeeping per variant ------------------------------------------------------------------------------------

@dataclass
class VariantTally:
    nll_sum: float = 0.0
    nll_tokens: int = 0
    kl_sum: float = 0.0
    top1_sum: float = 0.0
    window_ppl: list[float] = field(default_factory=list)
    chunk_counts: dict[int, int] = field(default_factory=dict)  # level bits -> sealed chunks assigned
    scores: dict[str, list[float]] = field(default_factory=dict)
    agree_fp16: dict[str, list[float]] = field(default_factory=dict)

    def count_levels(self, levels: Sequence[KVLevel], sealed: int) -> None:
        """Count the levels of the first `sealed` chunks (the partial tail's is not a compression choice)."""
        for level in levels[:sealed]:
            self.chunk_counts[int(level)] = self.chunk_counts.get(int(level), 0) + 1


def ppl_window(model: Transformer, spec: KVSpec, ids_a: torch.Tensor, ids_b: torch.Tensor, geom: ChunkGeometry,
               policies: dict[str, LevelPolicy], tallies: dict[str, VariantTally]) -> SegmentKV:
    """NLL of B[1:] teacher-forced after A's KV under each policy (the first one is the KL/top-1 reference)."""
    n_a, n_b = ids_a.numel(), ids_b.numel()
    cache = DenseKVCache(spec, n_a + n_b)
    ctx = SegmentKV.build(cache.kv, n_a, prefill_with_density(model, ids_a, cache), geom)
    targets = ids_b[1:]
    ref: torch.Tensor | None = None
    for name, policy in policies.items():
        tally = tallies.setdefault(name, VariantTally())
        levels = policy(ctx)
        ctx.write(levels, cache)
        cache.truncate(n_a)
        logits = model.forward(ids_b, torch.arange(n_a, n_a + n_b), cache.append(n_b))[:-1]
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, targets[:, None]).sum().item()
        if ref is None:
            ref = logp
        tally.nll_sum += nll
        tally.nll_tokens += targets.numel()
        tally.window_ppl.append(math.exp(nll / targets.numel()))
        tally.kl_sum += (ref.exp() * (ref - logp)).sum().item()
        tally.top1_sum += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
        tally.count_levels(levels, ctx.sealed_chunks)
    return ctx


def run_item(loaded: LoadedModel, generator: Generator, item: Item, geom: ChunkGeometry,
             policies: dict[str, LevelPolicy], tallies: dict[str, VariantTally]) -> dict[str, str]:
    """The context call once (fp16 KV and densities), then the question call greedily per variant."""
    n = len(item.context_ids)
    cache = DenseKVCache(KVSpec.from_config(loaded.config), n + len(item.question_ids) + item.max_new_tokens)
    density = prefill_with_density(loaded.model, torch.tensor(item.context_ids), cache)
    ctx = SegmentKV.build(cache.kv, n, density, geom)
    task = TASKS[item.task]
    answers: dict[str, str] = {}
    for variant, policy in policies.items():
        tally = tallies.setdefault(variant, VariantTally())
        levels = policy(ctx)
        ctx.write(levels, cache)
        cache.truncate(n)
        answers[variant] = generator.generate(GenerateRequest(item.question_ids, item.max_new_tokens), cache).text
        tally.scores.setdefault(item.task, []).append(score(task, answers[variant], item.gold))
        first = next(iter(answers.values()))
        tally.agree_fp16.setdefault(item.task, []).append(float(answers[variant].strip() == first.strip()))
        tally.count_levels(levels, ctx.sealed_chunks)
    return answers


# -- the run --------------------------------------------------------------------------------------------------------

class Progress:
    """Progress lines on stderr with an ETA from the work done so far (units: prefill-token equivalents)."""

    def __init__(self, total_units: float) -> None:
        self.total, self.done, self.t0 = max(total_units, 1e-9), 0.0, time.perf_counter()

    def step(self, units: float, label: str) -> None:
        self.done += units
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"  {label:<28} {100 * self.done / self.total:5.1f}%  elapsed {elapsed:6.0f} s  ETA {eta:6.0f} s",
              file=sys.stderr, flush=True)


def ppl_segments(ids: Sequence[int], cfg: EvalConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cfg.ppl_windows (A, B) pairs spread evenly over the token stream, without overlap."""
    width = cfg.ppl_context_tokens + cfg.ppl_target_tokens
    if cfg.ppl_windows == 0:
        return []
    if len(ids) < width * cfg.ppl_windows:
        raise ValueError(f"the text has {len(ids)} tokens; {cfg.ppl_windows} windows of {width} need more")
    stride = (len(ids) - width) // max(cfg.ppl_windows - 1, 1)
    out = []
    for w in range(cfg.ppl_windows):
        window = torch.tensor(ids[w * stride:w * stride + width])
        out.append((window[:cfg.ppl_context_tokens], window[cfg.ppl_context_tokens:]))
    return out


def evaluate(loaded: LoadedModel, cfg: EvalConfig, ppl_text: str, items: Sequence[Item],
             variants: Sequence[str] = VARIANTS) -> dict:
    """Run both harnesses and return the result document (see `llmaas eval kv --help` for its shape)."""
    if variants[0] != "fp16":
        raise ValueError("the fp16 variant must come first: it is the reference for KL, top-1 and agreement")
    t0 = time.perf_counter()
    spec = KVSpec.from_config(loaded.config)
    geom = ChunkGeometry(spec, cfg.chunk_tokens)
    segments = ppl_segments(loaded.tokenizer.encode(ppl_text, add_bos=False), cfg) if cfg.ppl_windows else []
    policies = {v: variant_policy(v, cfg.ratio_global) for v in variants}
    tallies = {v: VariantTally() for v in variants}
    nv = len(variants)
    window_units = 1.4 * cfg.ppl_context_tokens + nv * cfg.ppl_target_tokens
    item_units = [1.4 * len(it.context_ids) + nv * (len(it.question_ids) + DECODE_COST * it.max_new_tokens)
                  for it in items]
    progress = Progress(window_units * len(segments) + sum(item_units))
    for w, (ids_a, ids_b) in enumerate(segments):
        ppl_window(loaded.model, spec, ids_a, ids_b, geom, policies, tallies)
        progress.step(window_units, f"perplexity window {w + 1}/{len(segments)}")
    generator = Generator(loaded.model, loaded.tokenizer)
    examples: dict[str, list[dict]] = {}
    for i, (item, units) in enumerate(zip(items, item_units, strict=True)):
        answers = run_item(loaded, generator, item, geom, policies, tallies)
        if len(examples.setdefault(item.task, [])) < 2:
            examples[item.task].append({"id": item.id, "gold": item.gold, "answers": answers})
        progress.step(units, f"{item.task} item {i + 1}/{len(items)}")
    return assemble(cfg, geom, tallies, items, examples, time.perf_counter() - t0)


def assemble(cfg: EvalConfig, geom: ChunkGeometry, tallies: dict[str, VariantTally], items: Sequence[Item],
             examples: dict, runtime_s: float) -> dict:
    """The result document from the tallies (perplexity, bytes, fidelity, task scores), less machine and model."""
    tasks = list(dict.fromkeys(it.task for it in items))
    chunk_bytes = {lv: geom.payload_bytes(lv) for lv in KVLevel}
    result: dict = {"variants": {}, "ci95": {}, "bytes": {}, "fidelity": {}, "agree_fp16": {}, "ppl_windows": {}}
    fp16_ppl = None
    for variant, t in tallies.items():
        ppl = math.exp(t.nll_sum / t.nll_tokens) if t.nll_tokens else None
        fp16_ppl = fp16_ppl if fp16_ppl is not None else ppl
        chunks = sum(t.chunk_counts.values())
        total_bytes = sum(chunk_bytes[KVLevel(bits)] * n for bits, n in t.chunk_counts.items())
        bpt = total_bytes / (chunks * cfg.chunk_tokens) if chunks else None
        result["variants"][variant] = {
            "ppl": ppl, "bytes_per_token": bpt,
            "accuracy": {task: mean_ci95(t.scores[task])[0] for task in tasks},
        }
        result["ci95"][variant] = {task: list(mean_ci95(t.scores[task])[1:]) for task in tasks}
        result["bytes"][variant] = {
            "nominal_ratio": sum(bits * n for bits, n in t.chunk_counts.items()) / (8 * chunks) if chunks else None,
            "effective_ratio": total_bytes / (chunk_bytes[KVLevel.INT8] * chunks) if chunks else None,
            "level_fractions": {KVLevel(bits).name: n / chunks for bits, n in sorted(t.chunk_counts.items())},
            "sealed_chunks": chunks,
        }
        result["fidelity"][variant] = {
            "kl_to_fp16": t.kl_sum / t.nll_tokens if t.nll_tokens else None,
            "top1_agreement": t.top1_sum / t.nll_tokens if t.nll_tokens else None,
            "ppl_increase_pct": 100 * (ppl / fp16_ppl - 1) if ppl and fp16_ppl else None,
        }
        result["agree_fp16"][variant] = {task: mean_ci95(t.agree_fp16[task])[0] for task in tasks}
        result["ppl_windows"][variant] = t.window_ppl
    metrics = {task: TASKS[task].metric for task in tasks}
    result["config"] = {**asdict(cfg), "tasks": tasks, "task_metrics": metrics,
                        "level_error": {lv.name: e for lv, e in codec.LEVEL_ERROR.items()},
                        "chunk_bytes": {lv.name: b for lv, b in chunk_bytes.items()},
                        "rows": f"first `limit` non-empty rows after random.Random({ROW_SEED}).shuffle of each "
                                "task file (the non-held-out 80% in shared/data)",
                        "items": {task: [it.id for it in items if it.task == task] for task in tasks}}
    result["examples"] = examples
    result["runtime_s"] = runtime_s
    return result


def table(result: dict) -> str:
    """The result as text: one row per variant (bytes, ppl, its increase, KL, top-1, task scores and their mean)."""
    tasks = result["config"]["tasks"]
    head = f"{'variant':<11}{'B/token':>9}{'eff.':>6}{'ppl':>8}{'Δppl%':>7}{'KL':>8}{'top1':>6}"
    head += "".join(f"{t[:9]:>10}" for t in tasks) + f"{'mean':>7}"
    lines = [head]
    for variant, r in result["variants"].items():
        b, f = result["bytes"][variant], result["fidelity"][variant]
        acc = [r["accuracy"][t] for t in tasks]
        cells = [fmt(r["bytes_per_token"], 9, 0), fmt(b["effective_ratio"], 6, 2), fmt(r["ppl"], 8, 2),
                 fmt(f["ppl_increase_pct"], 7, 1), fmt(f["kl_to_fp16"], 8, 4), fmt(f["top1_agreement"], 6, 3)]
        cells += [fmt(a, 10, 3) for a in acc] + [fmt(sum(acc) / len(acc) if acc else None, 7, 3)]
        lines.append(f"{variant:<11}" + "".join(cells))
    lines.append("(B/token: true bytes incl. scales per sealed-chunk token; eff.: vs all-INT8 bytes; task scores in "
                 "[0,1]: " + ", ".join(f"{t} {m}" for t, m in result["config"]["task_metrics"].items()) + ")")
    return "\n".join(lines)


def fmt(x: float | None, width: int, digits: int) -> str:
    """x right-aligned in width with digits decimals, or a dash for None."""
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def plot(result: dict, path: Path) -> bool:
    """Perplexity and mean task score against bytes per token, written to path; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (variant, r) in enumerate(result["variants"].items()):
        accs = list(r["accuracy"].values())
        for ax, y in ((axes[0], r["ppl"]), (axes[1], sum(accs) / len(accs) if accs else None)):
            if y is not None and r["bytes_per_token"] is not None:
                ax.scatter(r["bytes_per_token"], y, color=f"C{i}")
                # staggered labels: LLMS and INT4 sit on top of each other by design (same bytes)
                ax.annotate(variant, (r["bytes_per_token"], y), textcoords="offset points", xytext=(6, 8 - 7 * i),
                            color=f"C{i}", fontsize=8)
    cfg = result["config"]
    axes[0].set_title(f"WikiText-2 ppl of B ({cfg['ppl_target_tokens']}) after compressed A "
                      f"({cfg['ppl_context_tokens']}), {cfg['ppl_windows']} windows")
    axes[0].set_ylabel("perplexity")
    axes[1].set_title(f"mean task score over {len(cfg['tasks'])} tasks, {cfg['limit']} items each")
    axes[1].set_ylabel("score (accuracy / ROUGE-L / chrF, 0..1)")
    for ax in axes:
        ax.set_xlabel("KV bytes per token (true, incl. scales)")
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
    fig.suptitle(f"KV compression at ratio_global {cfg['ratio_global']}, chunk {cfg['chunk_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(loaded: LoadedModel, cfg: EvalConfig, json_path: Path | None = None, png_path: Path | None = None) -> dict:
    """Evaluate every variant on `cfg`'s windows and items, print the table, and write the JSON and plot if asked."""
    from llmaas.bench.results import machine

    if codec.LEVEL_ERROR[KVLevel.INT4] == 0 or codec.LEVEL_ERROR[KVLevel.INT2] == 0:
        print("warning: codec.LEVEL_ERROR is not measured yet (e(INT4) or e(INT2) is 0): the density_error "
              "objective degenerates", file=sys.stderr)
    conversation = Conversation(loaded.tokenizer, loaded.chat_template)
    items = [it for task in cfg.tasks for it in load_items(TASKS[task], cfg.limit, loaded.tokenizer, conversation)]
    text = WIKITEXT.read_text(encoding="utf-8") if cfg.ppl_windows else ""
    print(f"evaluating {len(VARIANTS)} KV variants: {cfg.ppl_windows} perplexity windows, {len(items)} task items "
          f"({cfg.limit} per task)", file=sys.stderr, flush=True)
    result = evaluate(loaded, cfg, text, items)
    result["machine"] = machine()
    result["config"]["model"] = loaded.config.name
    result["config"]["threads"] = torch.get_num_threads()
    print(table(result))
    print(f"runtime {result['runtime_s']:.0f} s")
    if json_path:
        write_json(result, json_path)
    png = png_path or (json_path.with_suffix(".png") if json_path else None)
    if png is not None and plot(result, png):
        print(f"wrote {png}")
    return result
