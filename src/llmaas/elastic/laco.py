"""LaCo, layer collapse (ELASTILM.md §10.5): the baseline that merges rear layers into the one before them instead of
dropping them, one merged model per ratio.

Owns the walk and the merged models. The walk starts with the base at L - 1 - 4 and goes down one layer after every
try, clamped at 0. A try merges the next (up to) 3 layers of the current model into the base by the paper's RDSC
rule, θ_base + Σ_k (θ_k − θ_base), over the seven projections; the base keeps its norms. The try is accepted when the
mean cosine similarity of the merged and the original model's final hidden states (flattened) over 5 fixed
snippets exceeds the threshold (0.45, lowered by 0.1 each time the walk sits at layer 0). It stops at ⌊r·L⌋ layers.
Decisions where the artifact differs (docs/ELASTIC_SERVING.md): its merge subtracts the base as already updated, so
θ_base ends as the last merged layer's weights, not RDSC; and its last merge may overshoot ⌊r·L⌋ layers, where ours
merges only as many as reach it.

A merged layer is a linear mix of original layers, so a plan (per layer: whose norms, which original layers with
which coefficients) is all that is stored (`laco.json` under the elastic directory, with the snippets and each
try); the weights are rebuilt from the GGUF when a model is built, merged projections as Q8_0 blocks (the kernels'
format; the original layers stay the shared 4-bit blocks). Runs on the original (unreordered) weights: merging is
not invariant to each layer's own neuron order. Ignores scoring and latency (bench/elastic_serving.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from llmaas.elastic.dense_forward import DenseLayer, DenseWeights, hidden_states
from llmaas.model.linear import Linear
from llmaas.model.loader import LoadedModel
from llmaas.model.transformer import LayerWeights, Transformer
from llmaas.model.weights import quantize_q8
from llmaas.paths import SHARED_DATA_DIR
from llmaas.shared_data import read_jsonl

LACO_FILE = "laco.json"
MERGE_LAYERS = 3  # layers merged into the base per try (the artifact's MERGE_LAYERS = 4 counts the base)
START_BELOW_TOP = 4  # the base starts at L - 1 - 4
THRESHOLD, THRESHOLD_STEP = 0.45, 0.1
SNIPPETS, SNIPPET_WORDS = 5, 14
_PROJECTIONS = ("wq", "wk", "wv", "wo", "wg", "wu", "wd")

Mix = tuple[tuple[int, float], ...]  # (original layer, coefficient) of the seven projections


@dataclass(frozen=True)
class MergedLayer:
    norms: int  # the original layer whose two RMSNorm weights it keeps (the base of its merges)
    mix: Mix

    @classmethod
    def original(cls, layer: int) -> MergedLayer:
        return cls(layer, ((layer, 1.0),))

    @property
    def is_original(self) -> bool:
        return self.mix == ((self.norms, 1.0),)


def merge(layers: list[MergedLayer], base: int, count: int) -> list[MergedLayer]:
    """layers[base] := θ_base + Σ_k (θ_k − θ_base) over the `count` layers after it, which are removed."""
    coef: dict[int, float] = {}
    for j, c in layers[base].mix:
        coef[j] = coef.get(j, 0.0) + (1 - count) * c
    for k in range(base + 1, base + 1 + count):
        for j, c in layers[k].mix:
            coef[j] = coef.get(j, 0.0) + c
    mix = tuple(sorted((j, c) for j, c in coef.items() if c != 0.0))
    return [*layers[:base], MergedLayer(layers[base].norms, mix), *layers[base + 1 + count:]]


def snippets(data_dir: Path = SHARED_DATA_DIR) -> list[str]:
    """5 fixed short Wikipedia snippets (LaCo's calibration): the opening words of the first articles of WikiText-2,
    its tokenization spacing undone. Only merge acceptance reads them; no multiple-choice item is among them."""
    out = []
    for row in read_jsonl(data_dir / "wikitext2" / "test.jsonl"):
        body = next((line for line in row["text"].split("\n") if line.strip() and not line.strip().startswith("=")),
                    "")
        text = re.sub(r" @(.)@ ", r"\1", body.strip())
        text = re.sub(r" ([,.;:'])", r"\1", text)
        words = text.split()
        if len(words) >= SNIPPET_WORDS:
            out.append(" ".join(words[:SNIPPET_WORDS]))
        if len(out) == SNIPPETS:
            return out
    raise FileNotFoundError(f"fewer than {SNIPPETS} WikiText-2 articles in {data_dir / 'wikitext2'}")


class _Dense:
    """Dense fp32 layers of mixes, each built once."""

    def __init__(self, original: DenseWeights) -> None:
        self.original = original
        self._built: dict[MergedLayer, DenseLayer] = {}

    def layer(self, m: MergedLayer) -> DenseLayer:
        if m.is_original:
            return self.original.layers[m.norms]
        if m not in self._built:
            src = self.original.layers
            mixed = {name: sum(c * getattr(src[j], name) for j, c in m.mix) for name in _PROJECTIONS}
            self._built[m] = DenseLayer(attn_norm=src[m.norms].attn_norm, ffn_norm=src[m.norms].ffn_norm, **mixed)
        return self._built[m]

    def weights(self, layers: list[MergedLayer]) -> DenseWeights:
        return replace(self.original, layers=tuple(self.layer(m) for m in layers))


@torch.no_grad()
def collapse(model: Transformer, dense: DenseWeights, ids: list[torch.Tensor], keep: int,
             start_threshold: float = THRESHOLD) -> tuple[list[MergedLayer], list[dict]]:
    """The walk down to `keep` layers; returns the layers and every try (base, layers merged, similarity,
    threshold, accepted)."""
    n = len(dense.layers)
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in 1..{n}; got {keep}")
    built = _Dense(dense)
    reference = [hidden_states(model, dense, x[None]).flatten() for x in ids]
    layers = [MergedLayer.original(i) for i in range(n)]
    base, threshold, tries = max(0, n - 1 - START_BELOW_TOP), start_threshold, []
    while len(layers) > keep:
        if base == 0:
            threshold -= THRESHOLD_STEP
        count = min(MERGE_LAYERS, len(layers) - base - 1, len(layers) - keep)
        if count > 0:
            candidate = merge(layers, base, count)
            w = built.weights(candidate)
            sim = sum(F.cosine_similarity(hidden_states(model, w, x[None]).flatten(), ref, dim=0).item()
                      for x, ref in zip(ids, reference, strict=True)) / len(ids)
            accepted = sim > threshold
            tries.append({"base": base, "merged": count, "similarity": sim, "threshold": threshold,
                          "accepted": accepted})
            if accepted:
                layers = candidate
        base -= 1
        if base >= len(layers):  # the model shrank under the walk: start again below its top
            base = len(layers) - 1 - START_BELOW_TOP
        base = max(0, base)
    return layers, tries


def build_plans(loaded: LoadedModel, directory: Path, ratios: list[int], log: Callable[[str], object] = print,
                data_dir: Path = SHARED_DATA_DIR) -> dict:
    """The walk for every ratio (tenths) from the original model, written to `laco.json`; about a minute here."""
    started = time.perf_counter()
    texts = snippets(data_dir)
    ids = [torch.tensor(loaded.tokenizer.encode(t), dtype=torch.int64) for t in texts]
    dense = DenseWeights.expanded(loaded.config, loaded.model.weights)
    n = loaded.config.n_layers
    plans = {}
    for r in ratios:
        t0 = time.perf_counter()
        keep = r * n // 10
        layers, tries = collapse(loaded.model, dense, ids, keep)
        plans[str(r)] = {"keep": keep, "layers": [{"norms": m.norms, "mix": [list(x) for x in m.mix]}
                                                  for m in layers],
                         "tries": tries, "wall_s": time.perf_counter() - t0}
        log(f"  LaCo r={r / 10:.1f}: {keep} of {n} layers after {len(tries)} tries, "
            f"{sum(t['accepted'] for t in tries)} merges ({time.perf_counter() - started:.0f} s)")
    record = {"model": loaded.model_id, "snippets": texts, "threshold": THRESHOLD, "merge_layers": MERGE_LAYERS,
              "plans": plans, "wall_s": time.perf_counter() - started}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LACO_FILE).write_text(json.dumps(record, indent=1))
    return record


def load_plans(directory: Path, model_id: str) -> dict[int, list[MergedLayer]] | None:
    """The stored plans per ratio, or None when absent or made for another model."""
    try:
        record = json.loads((directory / LACO_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("model") != model_id:
        return None
    return {int(r): [MergedLayer(m["norms"], tuple((int(j), float(c)) for j, c in m["mix"])) for m in p["layers"]]
            for r, p in record["plans"].items()}


def laco_model(loaded: LoadedModel, layers: list[MergedLayer], dense: DenseWeights | None = None) -> Transformer:
    """The collapsed model over `loaded`'s original (unreordered) weights: original layers shared as they are,
    merged ones as new Q8_0 projections. `dense` (the model's fp32 expansion) is made here when not given."""
    w, c = loaded.model.weights, loaded.config

    def linear(t: torch.Tensor) -> Linear:
        return Linear(quantize_q8(t), loaded.model.kernels, w.layers[0].qkv.gemm)

    out: list[LayerWeights] = []
    for m in layers:
        if m.is_original:
            out.append(w.layers[m.norms])
            continue
        dense = dense if dense is not None else DenseWeights.expanded(c, w)
        d = _Dense(dense).layer(m)
        out.append(LayerWeights(d.attn_norm, linear(torch.cat([d.wq, d.wk, d.wv])), linear(d.wo), d.ffn_norm,
                                linear(torch.cat([d.wg, d.wu])), linear(d.wd)))
    return Transformer(replace(c, n_layers=len(out)), replace(w, layers=tuple(out)), loaded.model.kernels)

