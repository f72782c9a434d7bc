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


class _ChoicesView:
    """The question and every choice's tokens (but its last) in one pass after the cached context, at their true
    positions: the question is causal, each choice sees the context, the whole question and its own earlier tokens,
    never another choice. Nothing is written to the cache."""

    def __init__(self, cache: DenseKVCache, question: list[int], choices: list[list[int]]) -> None:
        self.cache, n, nq = cache, cache.num_tokens, len(question)
        seg = torch.cat([torch.full((nq,), -1)] + [torch.full((len(c) - 1,), k) for k, c in enumerate(choices)])
        self.positions = torch.cat([torch.arange(n, n + nq)]
                                   + [torch.arange(n + nq, n + nq + len(c) - 1) for c in choices])
        causal = self.positions[None, :] <= self.positions[:, None]
        visible = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
        self.mask = torch.cat([torch.ones(len(seg), n, dtype=torch.bool), causal & visible], dim=1)

    def key_positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(self.cache.num_tokens), self.positions])

    def attention_mask(self) -> torch.Tensor:
        return self.mask

    def update(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        context = self.cache.kv[layer][:, :, :self.cache.num_tokens]
        return torch.cat([context.to(kv.dtype), kv], dim=2)


def choice_scores(model: Transformer, cache: DenseKVCache, question: list[int], choices: list[list[int]],
                  widths: ModelWidths | None, lora: ModelLora | None) -> list[float]:
    """Mean log-probability of each choice's tokens after the cached context and the question, in one pass."""
    view = _ChoicesView(cache, question, choices)
    ids = torch.tensor(question + [t for c in choices for t in c[:-1]])
    rows = torch.log_softmax(model.forward(ids, view.positions, view, widths=widths, lora=lora), dim=-1)
    scores, r = [], len(question)
    for c in choices:
        picked = [rows[len(question) - 1, c[0]]] + [rows[r + j, c[j + 1]] for j in range(len(c) - 1)]
        scores.append(float(sum(picked)) / len(c))
        r += len(c) - 1
    return scores


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
