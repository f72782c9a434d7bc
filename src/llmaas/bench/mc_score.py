"""Scoring for the elastic evaluation: multiple-choice log-likelihood with a shared prefix, and perplexity.

Owns the protocol: the task's context is prefilled once per sub-model; per item the question is prefilled after it
and each choice (tokenized separately, then concatenated) is scored by the mean log-probability of its tokens
against that KV; the argmax is the answer. Perplexity is over non-overlapping windows of WikiText-2 test, each from
a fresh cache. Ignores which sub-models run (eval_elastic.py).
"""

from __future__ import annotations

import math

import torch

from llmaas.bench.mc_tasks import MCTask
from llmaas.elastic.choices import choice_scores
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.lora import ModelLora
from llmaas.model.tokenizer import Tokenizer
from llmaas.model.transformer import Transformer
from llmaas.model.widths import ModelWidths


@torch.no_grad()
def score_task(model: Transformer, tokenizer: Tokenizer, task: MCTask, widths: ModelWidths | None,
               lora: ModelLora | None) -> list[bool]:
    """Per item: whether the highest mean-log-probability choice is the answer."""
    context = tokenizer.encode(task.context)
    cache = DenseKVCache(KVSpec.from_config(model.config), len(context), dtype=torch.float32)
    model.forward(torch.tensor(context), torch.arange(len(context)), cache.append(len(context)), widths=widths,
                  lora=lora)
    correct = []
    for item in task.items:
        scores = choice_scores(model, cache, tokenizer.encode(item.question, add_bos=False),
                               [tokenizer.encode(c, add_bos=False) for c in item.choices], widths, lora)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == item.answer)
    return correct


@torch.no_grad()
def perplexity(model: Transformer, ids: list[int], windows: int, window_tokens: int, widths: ModelWidths | None,
               lora: ModelLora | None) -> float:
    """exp(mean next-token loss) over the first `windows` non-overlapping windows of ids."""
    if len(ids) < windows * window_tokens:
        raise ValueError(f"need {windows * window_tokens} tokens of text, have {len(ids)}")
    total, count = 0.0, 0
    spec = KVSpec.from_config(model.config)
    for w in range(windows):
        x = torch.tensor(ids[w * window_tokens:(w + 1) * window_tokens])
        cache = DenseKVCache(spec, window_tokens, dtype=torch.float32)
        logits = model.forward(x, torch.arange(window_tokens), cache.append(window_tokens), widths=widths, lora=lora)
        total += torch.nn.functional.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
        count += window_tokens - 1
    return math.exp(total / count)
