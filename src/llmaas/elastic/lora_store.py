"""Trained LoRA adapters on disk: one safetensors file per level, with its training record as metadata.

Owns file names, the format check and the shape check against the level's widths. Ignores training.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmaas.elastic.model_levels import model_level_name
from llmaas.model.config import ModelConfig
from llmaas.model.lora import ModelLora
from llmaas.model.widths import ModelWidths


def adapter_path(directory: Path, level10: int) -> Path:
    return directory / "lora" / f"level_{model_level_name(level10)}.safetensors"


def save_adapter(directory: Path, level10: int, lora: ModelLora, record: dict) -> Path:
    path = adapter_path(directory, level10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.detach().contiguous() for k, v in lora.tensors().items()}
    save_file(tensors, str(tmp), metadata={"json": json.dumps({"scale": lora.scale, **record})})
    tmp.replace(path)
    return path


def adapter_record(directory: Path, level10: int) -> dict | None:
    path = adapter_path(directory, level10)
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["json"])


def load_adapter(directory: Path, level10: int, config: ModelConfig,
                 widths: ModelWidths) -> tuple[ModelLora, dict] | None:
    """The level's adapter as served (fp16, ModelLora.served) and its training record, or None if none is trained; a
    file that does not fit the widths is refused."""
    record = adapter_record(directory, level10)
    if record is None:
        return None
    lora = ModelLora.from_tensors(load_file(str(adapter_path(directory, level10))), widths, record["scale"])
    lora.check(config)
    return lora.served(), record
