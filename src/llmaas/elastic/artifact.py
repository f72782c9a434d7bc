"""The elastic build artifact: what `llmaas elastic build` measured and decided, saved once per model.

Owns the file (safetensors: importance scores and unit orders as tensors; layer scores, anchors, the level table,
the calibration recipe, stage timings and the model fingerprint as JSON metadata) and its directory under the cache
(`$LLMAAS_CACHE/elastic/<model>/`, next to the LoRA adapters and the latency profile). Ignores how it is applied.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmaas.elastic.layer_scores import LayerScores
from llmaas.elastic.reorder import LayerOrder
from llmaas.errors import ModelFileError
from llmaas.model.widths import LayerWidths, ModelWidths
from llmaas.paths import cache_dir

FORMAT_VERSION = "1"
ARTIFACT_FILE = "elastic.safetensors"


def elastic_dir(model_id: str, root: Path | None = None) -> Path:
    """Where one model's elastic artifacts live (created on demand)."""
    safe = model_id.replace(":", "-").replace("/", "_")
    return (root if root is not None else cache_dir() / "elastic") / safe


@dataclass(frozen=True, eq=False)
class ElasticArtifact:
    model_id: str
    calibration: dict  # source, num_samples, num_tokens, seed
    scores: LayerScores
    anchors: tuple[int, ...]
    head_importance: torch.Tensor  # fp32 [n_layers, n_heads], original head order
    neuron_importance: torch.Tensor  # fp32 [n_layers, ffn]
    orders: dict[int, LayerOrder]  # elastic layers only
    levels: dict[int, ModelWidths]  # level in tenths -> widths (of the reordered model)
    timings_s: dict[str, float]

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        layers = sorted(self.orders)
        tensors = {"head_importance": self.head_importance.contiguous(),
                   "neuron_importance": self.neuron_importance.contiguous(),
                   "head_order": torch.stack([self.orders[i].heads for i in layers]) if layers else torch.zeros(0),
                   "neuron_order": torch.stack([self.orders[i].neurons for i in layers]) if layers else torch.zeros(0)}
        meta = {"format_version": FORMAT_VERSION, "class": "ElasticArtifact", "model_id": self.model_id,
                "calibration": self.calibration, "scores": asdict(self.scores), "anchors": list(self.anchors),
                "order_layers": layers, "timings_s": self.timings_s,
                "levels": {str(k): [[list(w.q_heads), w.ffn] for w in v.layers] for k, v in self.levels.items()}}
        path = directory / ARTIFACT_FILE
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"json": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path, model_id: str) -> ElasticArtifact:
        path = directory / ARTIFACT_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `llmaas elastic build` first")
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["json"])
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{path} has format {meta.get('format_version')}; rebuild with `llmaas elastic "
                                 "build --refresh`")
        if meta["model_id"] != model_id:
            raise ModelFileError(f"{path} was built for {meta['model_id']}, not {model_id}; rebuild it")
        t = load_file(str(path))
        orders = {i: LayerOrder(t["head_order"][k], t["neuron_order"][k]) for k, i in enumerate(meta["order_layers"])}
        levels = {int(k): ModelWidths(tuple(LayerWidths(tuple(q), f) for q, f in v)) for k, v in meta["levels"].items()}
        return cls(meta["model_id"], meta["calibration"], LayerScores(**{k: _tuple(v) for k, v in
                                                                         meta["scores"].items()}),
                   tuple(meta["anchors"]), t["head_importance"], t["neuron_importance"], orders, levels,
                   meta["timings_s"])


def _tuple(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v
