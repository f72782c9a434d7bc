"""Multiple-choice scoring by log-likelihood (ELASTILM.md §9), shared by the runtime's `choose`, its self-induced
labels and the evaluation: the prompt is prefilled once, then the question and every choice are scored in one pass
against its KV.

Owns the protocol: the prompt (context) and the question and each choice are tokenized separately and concatenated;
a choice's score is the mean log-probability of its tokens; the answer is the argmax. Ignores which sub-model runs.
"""

from __future__ import annotations

import torch

from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.lora import ModelLora
from llmaas.model.tokenizer import Tokenizer
from llmaas.model.transformer import Transformer
from llmaas.model.widths import ModelWidths


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
def prefill_context(model: Transformer, tokenizer: Tokenizer, context: str, widths: ModelWidths | None,
                    lora: ModelLora | None) -> DenseKVCache:
    """A fresh fp32 cache holding `context` (with BOS where the model wants one). A context compressed to nothing
    leaves it empty: the question then comes first."""
    ids = tokenizer.encode(context)
    cache = DenseKVCache(KVSpec.from_config(model.config), max(1, len(ids)), dtype=torch.float32)
    if ids:
        model.forward(torch.tensor(ids, dtype=torch.int64), torch.arange(len(ids)), cache.append(len(ids)),
                      widths=widths, lora=lora)
    return cache


@torch.no_grad()
def score_choices(model: Transformer, tokenizer: Tokenizer, context: str, question: str, choices: list[str],
                  widths: ModelWidths | None, lora: ModelLora | None) -> list[float]:
    """One request: prefill `context` into a fresh cache, then score each choice after `question` (both without
    BOS). An empty question is scored as a single space, since the first choice token needs a row to predict it."""
    cache = prefill_context(model, tokenizer, context, widths, lora)
    q = tokenizer.encode(question or " ", add_bos=False)
    return choice_scores(model, cache, q, [tokenizer.encode(c, add_bos=False) for c in choices], widths, lora)
