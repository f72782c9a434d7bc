"""Self-induced labels for the decision head (ELASTILM.md §7 as decided for llmaas): every label question is answered
once at each of the 90 (m, p) configs through the runtime's own path (the tiny LM's word scores, the word-level
compressor at p, sub-model m with its LoRA, log-likelihood scoring), and every SLO pair's label is derived from
those answers by slo.label under the active feasibility rule (the m·p proxy or the measured latency table).

Owns the label questions (MMLU dev and ARC-Easy train, each minus its five few-shot examples, so no question is ever
an evaluation item; each with the evaluation's few-shot context), their split into train and held-out by question,
the per-question cache (one JSON line per question, resumable; it is started over when the adapters or the score
head it was made with change), and the derivation. Ignores training (decision_train.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmaas.elastic.dual_head import build_window, run_dual_head
from llmaas.elastic.latency import LatencyTable, measured_feasible
from llmaas.elastic.runtime import ElasticRuntime, mc_query_text
from llmaas.elastic.slo import (
    ALL_CONFIGS,
    DECODE_SLOS,
    PREFILL_SLOS,
    Config,
    Feasible,
    Slo,
    kept_context_tokens,
    label,
    proxy_feasible,
)
from llmaas.paths import SHARED_DATA_DIR
from llmaas.prompt.compress import compress
from llmaas.shared_data import read_jsonl

SEED = 42
RULES = ("measured", "proxy")


@dataclass(frozen=True)
class LabelQuestion:
    key: str  # content hash: what the cache files it under
    context: str  # the refinable context (instruction and few-shot examples)
    question: str
    choices: tuple[str, ...]
    answer: int
    held_out: bool


LABEL_SOURCES = ("mmlu/dev", "arc_easy/train")


def few_shot_context(instruction: str, shots: list[dict]) -> str:
    """The evaluation's prompt layout (bench/mc_tasks.py): an instruction, then question/answer examples."""
    return instruction + "\n\n" + "".join(f"{qa_text(r['question'])} {r['choices'][r['answer_index']]}\n\n"
                                          for r in shots)


def qa_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _sources(data_dir: Path) -> list[tuple[str, list[dict]]]:
    """(context, candidate rows) per source, each with the evaluation's own few-shot context. MMLU dev minus its five
    shots (the evaluation's MMLU items come from test); ARC-Easy train minus its five shots (its items come from
    validation). ARC-Easy is there because the 135M model is below chance on MMLU (1 of 24 right at the full level):
    MMLU alone made 89% of the labels fallbacks and taught the head one config."""
    dev = read_jsonl(data_dir / "mmlu" / "dev.jsonl")
    shots = random.Random(SEED).sample(dev, 5)
    shot_ids = {r["id"] for r in shots}
    mmlu = [r for r in dev if r["id"] not in shot_ids]
    random.Random(f"{SEED}/decision").shuffle(mmlu)
    arc = read_jsonl(data_dir / "arc_easy" / "train.jsonl")
    arc_rows = arc[5:]
    random.Random(f"{SEED}/decision/arc").shuffle(arc_rows)
    return [(few_shot_context("Answer the multiple-choice question.", shots), mmlu),
            (few_shot_context("Answer the science question.", arc[:5]), arc_rows)]


def label_questions(count: int, held_out_fraction: float = 0.25, data_dir: Path = SHARED_DATA_DIR) -> \
        list[LabelQuestion]:
    """`count` questions taken alternately from the sources (seeded), never an evaluation item; about
    held_out_fraction of them held out (split by question)."""
    sources = _sources(data_dir)
    out = []
    for i in range(count):
        context, rows = sources[i % len(sources)]
        r = rows[i // len(sources)]
        q, choices = qa_text(r["question"]), tuple(" " + c for c in r["choices"])
        key = hashlib.sha1(repr((context, q, choices, r["answer_index"])).encode()).hexdigest()[:16]
        out.append(LabelQuestion(key, context, q, choices, r["answer_index"], i % round(1 / held_out_fraction) == 0))
    return out


def cache_meta(runtime: ElasticRuntime) -> dict:
    """What the answers depend on besides the question: the LLM, each level's adapter and the score head."""
    records = runtime.elastic.adapter_records
    return {"llm": runtime.elastic.loaded.model_id, "adapter_steps": {str(m): records[m]["steps"] for m in records},
            "score_head": _head_digest(runtime)}


def _head_digest(runtime: ElasticRuntime) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in list(runtime.tlm.score_layers.parameters()) + list(runtime.tlm.score_head.parameters()):
        h.update(p.detach().float().numpy().tobytes()[:4096])
    return h.hexdigest()


def answer_all_configs(runtime: ElasticRuntime, q: LabelQuestion) -> dict:
    """One question at every config: {"correct": {"m,p": bool}, token counts, the tiny LM's encoder tokens}. The
    word scores come from one tiny-LM pass (with the loosest SLO tokens: the score branch was trained to ignore
    them), as at run time."""
    choices = list(q.choices)
    query_tokens = runtime.choice_query_tokens(q.question, choices)
    context_tokens = runtime.count_tokens(q.context)
    query = mc_query_text(q.question, choices)
    out = run_dual_head(runtime.tlm, runtime.tok, 10, 10, q.context, query)
    encoder_tokens = len(build_window(runtime.tok, 10, 10, q.context, query).ids)
    correct = {}
    for p in sorted({c.p for c in ALL_CONFIGS}):
        text = compress(q.context, out.word_scores, kept_context_tokens(p, context_tokens, query_tokens),
                        runtime.count_tokens).text
        for m in sorted({c.m for c in ALL_CONFIGS}):
            scores = runtime.score(text, q.question, choices, m)
            correct[f"{m},{p}"] = max(range(len(scores)), key=scores.__getitem__) == q.answer
    return {"key": q.key, "held_out": q.held_out, "correct": correct, "context_tokens": context_tokens,
            "query_tokens": query_tokens, "encoder_tokens": encoder_tokens}


def answers_path(directory: Path) -> Path:
    return directory / "decision_labels" / "answers.jsonl"


def answer_questions(runtime: ElasticRuntime, questions: list[LabelQuestion], path: Path,
                     log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every question's answers at all configs, from the cache where it has them; one line appended per new
    question, so an interrupted run resumes at the next. The cache starts over when cache_meta changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta, meta_path = cache_meta(runtime), path.with_suffix(".meta.json")
    if path.exists() and (not meta_path.exists() or json.loads(meta_path.read_text()) != meta):
        log(f"{path}: made with other adapters or another score head; starting over")
        path.unlink()
    meta_path.write_text(json.dumps(meta))
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that question is answered again
                continue
            done[row["key"]] = row
    todo = [q for q in questions if q.key not in done]
    log(f"decision labels: {len(questions) - len(todo)} of {len(questions)} questions cached, {len(todo)} to answer "
        f"at {len(ALL_CONFIGS)} configs each")
    started = time.perf_counter()
    with open(path, "a", encoding="utf-8") as f:
        for i, q in enumerate(todo, 1):
            row = answer_all_configs(runtime, q)
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[q.key] = row
            elapsed = time.perf_counter() - started
            log(f"  question {i}/{len(todo)}: {sum(row['correct'].values())}/{len(ALL_CONFIGS)} configs correct, "
                f"{elapsed / i:.1f} s each, ETA {elapsed / i * (len(todo) - i):.0f} s")
    return {q.key: done[q.key] for q in questions}


def feasibility(rule: str, slo: Slo, row: dict, table: LatencyTable | None) -> Feasible:
    """The rule a label is derived under: the proxy, or the measured table at this question's prompt lengths,
    with the tiny LM's time for its window."""
    if rule == "proxy":
        return proxy_feasible(slo)
    if table is None:
        raise ValueError("measured labels need the latency table")
    lc, lq = row["context_tokens"], row["query_tokens"]
    full = (table.ttft_s(10, lc + lq), table.tpot_s(10))
    budgets = (slo.prefill / 10 * full[0], slo.decode / 10 * full[1])
    return measured_feasible(table, budgets, lc, lq, table.tlm_s(row["encoder_tokens"]))


def slo_grid() -> list[Slo]:
    """The 9 x 6 = 54 SLO pairs of the decision head (prefill 1.0 included, unlike the artifact's 48)."""
    return [Slo(pre, dec) for pre in PREFILL_SLOS for dec in DECODE_SLOS]


def derive_labels(rows: dict[str, dict], rule: str, table: LatencyTable | None) -> list[tuple[str, Slo, Config, bool]]:
    """(question key, SLO pair, label, fell_back) for every question and every pair of the grid."""
    out = []
    for key, row in rows.items():
        correct = {Config(*map(int, k.split(","))): v for k, v in row["correct"].items()}
        for slo in slo_grid():
            config, fell_back = label(correct, feasibility(rule, slo, row, table))
            out.append((key, slo, config, fell_back))
    return out
