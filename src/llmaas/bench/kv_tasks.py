"""The six LLMS trace tasks as two-call items for the KV-compression evaluation (spec §9, §10.4).

Owns what an item is (a "context call": the document in a user turn, closed by a fixed assistant ack; then a
"question call": the instruction, answered greedily), which dev rows are used, how documents are truncated and how
answers are scored (all scores in [0, 1]). Ignores the model, the KV and the variants (llmaas.bench.eval_kv).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from llmaas.bench.text_metrics import chrf, match_label, rouge_l
from llmaas.engine.conversation import Conversation
from llmaas.model.tokenizer import Tokenizer
from llmaas.paths import SHARED_DATA_DIR
from llmaas.records import Message
from llmaas.shared_data import read_jsonl

ACK = "OK."  # the context call's assistant turn: teacher-forced, so every variant sees the same context tokens
ROW_SEED = 0  # rows are drawn by random.Random(ROW_SEED).shuffle of the file's rows (all held-in, see SOURCES.md)


@dataclass(frozen=True)
class Task:
    name: str
    path: str  # under SHARED_DATA_DIR: the non-held-out 80% of the test/validation split
    text_field: str
    gold_field: str
    context: str  # the context call's user turn, formatted with {text}
    question: str  # the question call's user turn
    max_new_tokens: int  # spec §9: 8 for classification, 64 otherwise
    metric: str  # "accuracy", "rouge_l" or "chrf"
    max_doc_tokens: int  # documents are cut to this many tokens (keeps every prompt within ~1k tokens)
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()  # classification: label -> keywords that name it


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("ag_news", "ag_news/test.jsonl", "text", "label_name", "Here is a news article:\n\n{text}",
         "What is the topic of this news article? Answer with one word: World, Sports, Business or Technology.",
         8, "accuracy", 400,
         (("World", ("world", "politics")), ("Sports", ("sports", "sport")), ("Business", ("business",)),
          ("Sci/Tech", ("sci/tech", "technology", "science", "tech")))),
    Task("sst2", "sst2/validation.jsonl", "text", "label_name", "Here is a sentence from a movie review:\n\n{text}",
         "Is the sentiment of this review positive or negative? Answer with one word.", 8, "accuracy", 100,
         (("positive", ("positive",)), ("negative", ("negative",)))),
    Task("xsum", "xsum/test.jsonl", "document", "summary", "Here is an article:\n\n{text}",
         "Summarize the article in one sentence.", 64, "rouge_l", 900),
    Task("samsum", "samsum/test.jsonl", "document", "summary", "Here is a chat conversation:\n\n{text}",
         "Summarize the conversation in one or two sentences.", 64, "rouge_l", 400),
    Task("cnn_dailymail", "cnn_dailymail/test.jsonl", "document", "summary", "Here is a news article:\n\n{text}",
         "Summarize the article in three sentences.", 64, "rouge_l", 900),
    Task("wmt17_de_en", "wmt17_de_en/test.jsonl", "source", "target", "Here is a German text:\n\n{text}",
         "Translate the German text into English.", 64, "chrf", 400),
)}


@dataclass(frozen=True)
class Item:
    task: str
    id: str
    context_ids: tuple[int, ...]  # the whole context call: user turn + ack + the turn's closing tokens
    question_ids: tuple[int, ...]  # the question call's new tokens, up to where the answer begins
    gold: str
    max_new_tokens: int


def score(task: Task, answer: str, gold: str) -> float:
    if task.metric == "accuracy":
        return float(match_label(answer, dict(task.labels)) == gold)
    if task.metric == "rouge_l":
        return rouge_l(answer, gold)
    if task.metric == "chrf":
        return chrf(answer, gold) / 100
    raise ValueError(f"unknown metric {task.metric!r}")


def make_item(task: Task, row_id: str, text: str, gold: str, tokenizer: Tokenizer, conversation: Conversation,
              max_doc_tokens: int | None = None) -> Item:
    """The two calls of one item, tokenized exactly as the service's Conversation would append them."""
    limit = task.max_doc_tokens if max_doc_tokens is None else max_doc_tokens
    doc_ids = tokenizer.encode(text, add_bos=False, parse_special=False)
    if len(doc_ids) > limit:
        text = tokenizer.decode(doc_ids[:limit])
    user = task.context.format(text=text)
    context = conversation.prompt_ids([], user, starts_context=True)
    context += tokenizer.encode(ACK, add_bos=False, parse_special=False)
    context += conversation.closing_ids([], user, ACK)
    question = conversation.prompt_ids([Message("user", user), Message("assistant", ACK)], task.question,
                                       starts_context=False)
    return Item(task.name, row_id, tuple(context), tuple(question), gold, task.max_new_tokens)


def load_items(task: Task, limit: int, tokenizer: Tokenizer, conversation: Conversation,
               data_dir: Path = SHARED_DATA_DIR) -> list[Item]:
    """`limit` rows with a non-empty document, in random.Random(ROW_SEED)-shuffled file order."""
    rows = read_jsonl(data_dir / task.path)
    random.Random(ROW_SEED).shuffle(rows)
    items = []
    for row in rows:
        if len(items) == limit:
            break
        if str(row.get(task.text_field, "")).strip():
            items.append(make_item(task, str(row["id"]), row[task.text_field], str(row[task.gold_field]), tokenizer,
                                   conversation))
    return items

