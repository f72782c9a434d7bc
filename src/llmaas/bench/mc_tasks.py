"""The multiple-choice tasks of the ElastiLM evaluation: a shared refinable context per task (instruction and a few
fixed examples; for the agent tasks also the function docs or the app list) and items (question, choices, answer).

Owns the task list, the example and item selection (fixed examples first, then items drawn with a fixed seed from
the rest, so examples are never evaluated) and the text formats. Ignores the model and scoring (eval_elastic.py).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from llmaas.paths import SHARED_DATA_DIR
from llmaas.shared_data import read_jsonl

ITEM_SEED = 42


@dataclass(frozen=True)
class MCItem:
    question: str  # the text after the shared context, ending where the answer starts
    choices: tuple[str, ...]  # continuations, each scored by its mean token log-probability
    answer: int

    @property
    def key(self) -> str:
        """A content hash: what a cached score of this item is filed under (the same item in any sample)."""
        return hashlib.sha1(repr((self.question, self.choices, self.answer)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MCTask:
    name: str
    context: str  # shared by every item of the task: prefilled once per sub-model
    items: tuple[MCItem, ...]
    chance: float


def _qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _standalone(name: str, instruction: str, rows: list[dict], n_items: int, n_shots: int = 5) -> MCTask:
    """Examples: the first n_shots rows; items: a seeded sample of the rest (never the examples)."""
    shots, rest = rows[:n_shots], rows[n_shots:]
    context = instruction + "\n\n" + "".join(f"{_qa(r['question'])} {r['choices'][r['answer_index']]}\n\n"
                                             for r in shots)
    picked = random.Random(f"{ITEM_SEED}/{name}").sample(rest, min(n_items, len(rest)))
    items = tuple(MCItem(_qa(r["question"]), tuple(" " + c for c in r["choices"]), r["answer_index"]) for r in picked)
    return MCTask(name, context, items, sum(1 / len(i.choices) for i in items) / max(1, len(items)))


def arc_easy(n: int) -> MCTask:
    shots = read_jsonl(SHARED_DATA_DIR / "arc_easy" / "train.jsonl")[:5]
    val = read_jsonl(SHARED_DATA_DIR / "arc_easy" / "validation.jsonl")
    return _standalone("arc_easy", "Answer the science question.", shots + val, n)


def sciq(n: int) -> MCTask:
    rows = read_jsonl(SHARED_DATA_DIR / "sciq" / "validation.jsonl")
    return _standalone("sciq", "Answer the science question.", rows, n)


def openbookqa(n: int) -> MCTask:
    # OBQA's validation split is not in shared/data; its train split serves as the dev set (the choice)
    return _standalone("openbookqa", "Complete the statement with the correct answer.",
                       read_jsonl(SHARED_DATA_DIR / "openbookqa" / "train.jsonl"), n)


def mmlu(n: int) -> MCTask:
    dev = read_jsonl(SHARED_DATA_DIR / "mmlu" / "dev.jsonl")
    shots = random.Random(ITEM_SEED).sample(dev, 5)
    return _standalone("mmlu", "Answer the multiple-choice question.",
                       shots + read_jsonl(SHARED_DATA_DIR / "mmlu" / "test.jsonl"), n)


def octopus(n: int) -> MCTask:
    base = SHARED_DATA_DIR / "elastilm_octopus"
    funcs = read_jsonl(base / "functions.jsonl")
    docs = "".join(f"- {f['name']}: {f['description']}\n" for f in funcs) + "- irrelevant function: none of the above\n"
    dev = read_jsonl(base / "dev.jsonl")[:6]
    context = ("Pick the Android function that serves the user's request.\nFunctions:\n" + docs + "\n"
               + "".join(f"Request: {r['query']}\nFunction: {r['choices'][r['answer_index']]}\n\n" for r in dev))
    rows = read_jsonl(base / "validation.jsonl")
    picked = random.Random(f"{ITEM_SEED}/octopus").sample(rows, min(n, len(rows)))
    items = tuple(MCItem(f"Request: {r['query']}\nFunction:", tuple(" " + c for c in r["choices"]), r["answer_index"])
                  for r in picked)
    return MCTask("octopus", context, items, sum(1 / len(i.choices) for i in items) / max(1, len(items)))


def llamatouch(n: int) -> MCTask:
    base = SHARED_DATA_DIR / "elastilm_llamatouch"
    apps = sorted({r["app"] for r in read_jsonl(base / "task_metadata.jsonl")})
    dev = read_jsonl(base / "dev.jsonl")
    context = ("Pick the app that completes the user's task.\nApps: " + ", ".join(apps) + "\n\n"
               + "".join(f"Task: {r['instruction']}\nApp: {r['app']}\n\n" for r in dev))
    rows = [r for r in read_jsonl(base / "test.jsonl") if r["app"] in apps]
    picked = random.Random(f"{ITEM_SEED}/llamatouch").sample(rows, min(n, len(rows)))
    choices = tuple(" " + a for a in apps)
    items = tuple(MCItem(f"Task: {r['instruction']}\nApp:", choices, apps.index(r["app"])) for r in picked)
    return MCTask("llamatouch", context, items, 1 / len(apps))


STANDALONE = {"arc_easy": arc_easy, "sciq": sciq, "mmlu": mmlu, "openbookqa": openbookqa}
AGENT = {"octopus": octopus, "llamatouch": llamatouch}
