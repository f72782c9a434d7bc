"""Training the dual-head tiny LM's decision branch (ELASTILM.md §7) on the self-induced labels, and measuring it.

Owns the examples (one per question and SLO pair: the runtime's window `[pre] [dec] ` + context + question and
choices, with the label's p and m classes), the training loop (CE(p) + CE(m) on the decision layers and both heads;
the embeddings, the SLO-token rows and the lower layers stay frozen), early stopping on the held-out questions, and
the report: held-out p, m and joint accuracy beside the majority-class guess, the label distribution and the fallback
rate. By default the head trains only on informative labels: a fallback label (nothing feasible was right, §7's
rule) is the cheapest config whatever the question, and with a 135M model near chance those were 85% of the labels,
so training on them taught the majority config and nothing else (held-out accuracy = the majority guess). Batches
are 32, not the artifact's 128, and an epoch is a fresh random sample of the train examples: with ~50
train questions x 54 SLO pairs, 128 would leave a handful of optimizer steps in the time 2 cores can spare. Ignores
where the labels come from (decision_labels.py).
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmaas.elastic.decision_labels import (
    LABEL_SOURCES,
    LabelQuestion,
    answer_questions,
    answers_path,
    derive_labels,
    label_questions,
)
from llmaas.elastic.dual_head import (
    DualHeadTLM,
    build_window,
    default_heads_path,
    encoder_fingerprint,
    heads_record,
    save_heads,
)
from llmaas.elastic.latency import LatencyTable
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.elastic.runtime import ElasticRuntime, mc_query_text
from llmaas.elastic.slo import PROMPT_RATIOS, Config, Slo
from llmaas.paths import tiny_lm_dir
from llmaas.tlm.encoder import BertEncoder
from llmaas.tlm.tokenizer import pad_batch


@dataclass(frozen=True)
class DecisionTrainConfig:
    questions: int = 64  # label questions (each answered at 90 configs: the costly part)
    held_out_fraction: float = 0.25
    rule: str = "measured"  # the feasibility the labels follow: the service's (measured) or the paper's (proxy)
    epochs: int = 4  # at most; the best held-out epoch is kept
    examples_per_epoch: int = 768  # a fresh random sample of the train examples each epoch (all 54 pairs of every
    # train question would cost ~5 min an epoch on 2 cores)
    batch_size: int = 32
    lr: float = 5e-5
    budget_s: float = 300.0  # wall-time cap on the optimizer loop
    train_on_fallbacks: bool = False  # a fallback label says "nothing here was right", not which config is
    seed: int = 0

    def __post_init__(self) -> None:
        if self.questions < 2 or self.epochs < 1 or self.batch_size < 1 or self.budget_s <= 0 \
                or self.examples_per_epoch < 1 \
                or not 0 < self.held_out_fraction < 1 or self.rule not in ("measured", "proxy"):
            raise ValueError(f"invalid decision-head training config: {self}")


@dataclass
class DecisionExample:
    ids: list[int]
    p_class: int  # index into PROMPT_RATIOS (1.0 .. 0.1)
    m_class: int  # index into MODEL_LEVELS (0.2 .. 1.0)
    hidden: torch.Tensor | None = field(default=None, repr=False)  # frozen trunk output, bf16 [tokens, 384]


def make_examples(runtime: ElasticRuntime, questions: dict[str, LabelQuestion],
                  labels: Sequence[tuple[str, Slo, Config, bool]]) -> list[DecisionExample]:
    out = []
    for key, slo, config, _ in labels:
        q = questions[key]
        w = build_window(runtime.tok, slo.prefill, slo.decode, q.context, mc_query_text(q.question, list(q.choices)))
        out.append(DecisionExample(w.ids, PROMPT_RATIOS.index(config.p), MODEL_LEVELS.index(config.m)))
    return out


@torch.no_grad()
def precompute_trunk(model: DualHeadTLM, examples: list[DecisionExample], batch_size: int = 16,
                     log: Callable[[str], None] = print) -> None:
    started = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        ids, mask = pad_batch([e.ids for e in batch], model.config.pad_token_id)
        h = model.shared(ids, mask)
        for j, e in enumerate(batch):
            e.hidden = h[j, :len(e.ids)].to(torch.bfloat16).clone()
        done = i + len(batch)
        if (i // batch_size) % 20 == 0 or done == len(examples):
            elapsed = time.perf_counter() - started
            log(f"  trunk: {done}/{len(examples)} windows, ETA {elapsed / done * (len(examples) - done):.0f} s")


def _collate(examples: Sequence[DecisionExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(e.ids) for e in examples)
    h = torch.zeros(len(examples), longest, examples[0].hidden.shape[1])  # type: ignore[union-attr]
    mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for i, e in enumerate(examples):
        h[i, :len(e.ids)], mask[i, :len(e.ids)] = e.hidden.float(), True  # type: ignore[union-attr]
    return h, mask, torch.tensor([e.p_class for e in examples]), torch.tensor([e.m_class for e in examples])


@torch.no_grad()
def accuracy(model: DualHeadTLM, examples: Sequence[DecisionExample], batch_size: int = 64) -> dict[str, float]:
    """Held-out accuracy of p, of m and of both at once."""
    hits = Counter()
    for i in range(0, len(examples), batch_size):
        h, mask, p, m = _collate(examples[i:i + batch_size])
        lp, lm = model.decide(h, mask)
        ok_p, ok_m = lp.argmax(-1) == p, lm.argmax(-1) == m
        hits["p"] += int(ok_p.sum())
        hits["m"] += int(ok_m.sum())
        hits["both"] += int((ok_p & ok_m).sum())
    return {k: hits[k] / max(1, len(examples)) for k in ("p", "m", "both")}


def majority_accuracy(train: Sequence[DecisionExample], held: Sequence[DecisionExample]) -> dict[str, float]:
    """The accuracy of always answering the train labels' most common p and m: what a head must beat."""
    p = Counter(e.p_class for e in train).most_common(1)[0][0]
    m = Counter(e.m_class for e in train).most_common(1)[0][0]
    n = max(1, len(held))
    return {"p": sum(e.p_class == p for e in held) / n, "m": sum(e.m_class == m for e in held) / n,
            "both": sum(e.p_class == p and e.m_class == m for e in held) / n}


def train_decision_branch(model: DualHeadTLM, train: list[DecisionExample], held: list[DecisionExample],
                          config: DecisionTrainConfig, log: Callable[[str], None] = print) -> dict:
    """AdamW on the decision layers and heads; after each epoch the held-out joint accuracy, keeping the best
    epoch's weights (epoch 0 = untrained)."""
    params = [*model.decision_layers.parameters(), *model.p_head.parameters(), *model.m_head.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr)
    rng = random.Random(config.seed)
    best = (accuracy(model, held)["both"], 0, copy.deepcopy(model.trainable_modules()))
    history = [{"epoch": 0, **accuracy(model, held)}]
    started, step = time.perf_counter(), 0
    per_epoch = min(len(train), config.examples_per_epoch)
    total = config.epochs * ((per_epoch + config.batch_size - 1) // config.batch_size)
    for epoch in range(1, config.epochs + 1):
        order = rng.sample(train, per_epoch)
        model.train()
        for b in range(0, len(order), config.batch_size):
            if time.perf_counter() - started > config.budget_s:
                break
            h, mask, p, m = _collate(order[b:b + config.batch_size])
            lp, lm = model.decide(h, mask)
            loss = F.cross_entropy(lp, p) + F.cross_entropy(lm, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                per = (time.perf_counter() - started) / step
                log(f"  train: epoch {epoch}/{config.epochs} step {step}/{total} loss {loss.item():.3f} "
                    f"({per:.2f} s/step, ETA {per * (total - step):.0f} s)")
        model.eval()
        acc = accuracy(model, held)
        history.append({"epoch": epoch, **acc})
        log(f"  epoch {epoch}: held-out accuracy p {acc['p']:.3f}, m {acc['m']:.3f}, both {acc['both']:.3f}")
        if acc["both"] > best[0]:
            best = (acc["both"], epoch, copy.deepcopy(model.trainable_modules()))
        if time.perf_counter() - started > config.budget_s:
            log(f"  train: wall-time budget {config.budget_s:.0f} s reached")
            break
    for name, module in best[2].items():
        getattr(model, name).load_state_dict(module.state_dict())
    return {"best_epoch": best[1], "history": history, "steps": step, "train_s": time.perf_counter() - started}


def distribution(labels: Sequence[tuple[str, Slo, Config, bool]]) -> dict:
    n = max(1, len(labels))
    return {"m": {model_level_name(k): v / n for k, v in sorted(Counter(c.m for _, _, c, _ in labels).items())},
            "p": {f"{k / 10:.1f}": v / n for k, v in sorted(Counter(c.p for _, _, c, _ in labels).items())},
            "fallback_rate": sum(f for *_, f in labels) / n}


def build_decision_head(runtime: ElasticRuntime, directory: Path, config: DecisionTrainConfig,
                        log: Callable[[str], None] = print) -> dict:
    """The whole offline step: label questions answered at every config (cached), labels for the 54 SLO pairs,
    training, held-out accuracy; saves the heads (score branch untouched) with both records."""
    stages: dict[str, float] = {}
    path = default_heads_path(directory)
    score_record = heads_record(path)
    if score_record is None:
        raise FileNotFoundError(f"{path} is missing: train the score head first (`llmaas elastic score-head`)")
    t = time.perf_counter()
    questions = label_questions(config.questions, config.held_out_fraction)
    rows = answer_questions(runtime, questions, answers_path(directory), log)
    stages["answers_s"] = time.perf_counter() - t
    table = LatencyTable.load(directory) if config.rule == "measured" else None
    labels = derive_labels(rows, config.rule, table)
    by_key = {q.key: q for q in questions}
    train_labels = [x for x in labels if not by_key[x[0]].held_out and (config.train_on_fallbacks or not x[3])]
    held_labels = [x for x in labels if by_key[x[0]].held_out]
    t = time.perf_counter()
    train, held_all = make_examples(runtime, by_key, train_labels), make_examples(runtime, by_key, held_labels)
    # early stopping reads the same kind of labels as training: the informative ones unless fallbacks are trained on
    held = [e for e, x in zip(held_all, held_labels, strict=True) if config.train_on_fallbacks or not x[3]]
    precompute_trunk(runtime.tlm, train + held_all, log=log)
    stages["trunk_s"] = time.perf_counter() - t
    fresh = DualHeadTLM(BertEncoder.load(tiny_lm_dir()))  # start from the pretrained layers, not an earlier head
    for name in ("decision_layers", "p_head", "m_head"):
        getattr(runtime.tlm, name).load_state_dict(getattr(fresh, name).state_dict())
    log(f"decision head: {len(train)} train and {len(held)} held-out examples ({len(questions)} questions x 54 SLO "
        f"pairs, rule {config.rule})")
    trained = train_decision_branch(runtime.tlm, train, held, config, log)
    stages["train_s"] = trained["train_s"]
    accuracy_all = accuracy(runtime.tlm, held_all)
    for e in train + held_all:
        e.hidden = None
    record = {**score_record, "decision_branch": "trained", "decision": {
        "rule": config.rule, "latency_table": LatencyTable.digest(directory) if table is not None else None,
        "sources": list(LABEL_SOURCES), "questions": len(questions),
        "held_out_questions": sum(q.held_out for q in questions),
        "train_examples": len(train), "held_out_examples": len(held),
        "train_on_fallbacks": config.train_on_fallbacks, "held_out_accuracy": accuracy_from(trained),
        "majority_accuracy": majority_accuracy(train, held), "held_out_accuracy_all_labels": accuracy_all,
        "majority_accuracy_all_labels": majority_accuracy(train, held_all),
        "labels": distribution(labels), "questions_correct_at_full": sum(r["correct"]["10,10"] for r in rows.values()),
        "epochs": config.epochs, "examples_per_epoch": config.examples_per_epoch, "batch_size": config.batch_size,
        "lr": config.lr, **trained, "stages_s": stages,
        "threads": torch.get_num_threads()}}
    save_heads(runtime.tlm, path, encoder_fingerprint(tiny_lm_dir()), record)
    log(f"saved {path}")
    return record["decision"]


def accuracy_from(trained: dict) -> dict[str, float]:
    """The held-out accuracy of the kept epoch."""
    return next(h for h in trained["history"] if h["epoch"] == trained["best_epoch"])
