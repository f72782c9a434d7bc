"""The elastic model: one resident, reordered copy of the weights serving nine nested sub-models.

Owns loading a private copy of the model, reordering it once from the artifact, the per-level sub-model views
(widths + the level's LoRA, built once) and switching between them, which is a lookup: no weight is copied or
allocated. Ignores choosing a level (the later decision head) and training adapters (elastic/lora_train.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmaas.elastic.artifact import ElasticArtifact, elastic_dir
from llmaas.elastic.lora_store import load_adapter
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.elastic.reorder import reorder_
from llmaas.errors import InvalidRequestError
from llmaas.model.loader import LoadedModel, load_model
from llmaas.model.lora import ModelLora
from llmaas.model.widths import ModelWidths


@dataclass(frozen=True, eq=False)
class SubModel:
    level10: int
    widths: ModelWidths
    lora: ModelLora | None

    @property
    def name(self) -> str:
        return model_level_name(self.level10) + ("+lora" if self.lora is not None else "")


class ElasticModel:
    def __init__(self, loaded: LoadedModel, artifact: ElasticArtifact, adapters: dict[int, ModelLora],
                 directory: Path, adapter_records: dict[int, dict] | None = None) -> None:
        """Takes ownership of `loaded` (a fresh, unreordered load) and reorders it in place."""
        self.loaded = loaded
        self.directory = directory
        self.artifact = artifact
        self.adapters = adapters
        self.adapter_records = adapter_records or {}  # level -> training record (steps, tokens, losses, wall time)
        reorder_(loaded.config, loaded.model.weights, artifact.orders)
        loaded.model.weights_changed()
        self._views = {(m, False): SubModel(m, artifact.levels[m], None) for m in MODEL_LEVELS}
        self._views |= {(m, True): SubModel(m, artifact.levels[m], adapters[m]) for m in adapters}

    @classmethod
    def open(cls, model_path: str | Path | None = None, directory: Path | None = None, *, use_kernels: bool = True,
             with_lora: bool = True) -> ElasticModel:
        loaded = load_model(model_path, use_kernels=use_kernels)
        directory = directory if directory is not None else elastic_dir(loaded.model_id)
        artifact = ElasticArtifact.load(directory, loaded.model_id)
        adapters, records = {}, {}
        if with_lora:
            for m in MODEL_LEVELS:
                found = load_adapter(directory, m, loaded.config, artifact.levels[m])
                if found is not None:
                    adapters[m], records[m] = found
        return cls(loaded, artifact, adapters, directory, records)

    def view(self, level10: int, lora: bool = True) -> SubModel:
        """The sub-model at a level; with lora=True its adapter if one is trained (else none): a dict lookup."""
        if level10 not in MODEL_LEVELS:
            raise InvalidRequestError(f"model level {level10} (tenths) is not one of {MODEL_LEVELS}")
        return self._views.get((level10, lora)) or self._views[(level10, False)]

    @property
    def adapters_nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters.values())
