"""Shared fixtures: the real bundled model (loaded once per session, with and without native kernels), the kernels
(required in CI, where a silent fallback would hide a broken build) and tiny GGUFs for loader tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llmaas.errors import KernelBuildError
from llmaas.kernels import load_kernels
from llmaas.kv.dense import DenseKVCache
from llmaas.kv.spec import KVSpec
from llmaas.model.linear import FP32
from llmaas.model.loader import LoadedModel, load_model
from llmaas.paths import SHARED_DATA_DIR

DATA = Path(__file__).parent / "data"
SHARED_DATA = SHARED_DATA_DIR  # $LLMAAS_DATA, else ../shared/data beside the checkout


def has_bf16() -> bool:
    """Whether this machine offers the bf16 GEMM path (native kernels and AVX-512 BF16)."""
    try:
        return bool(load_kernels().has_bf16())
    except KernelBuildError:
        return False


@pytest.fixture(scope="session")
def kernels():
    try:
        return load_kernels()
    except KernelBuildError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"native kernels unavailable here: {exc}")


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The bundled model as users get it: native kernels when they build, else the dense path (the `kernels`
    fixture is what fails loudly in CI if they do not)."""
    return load_model()


@pytest.fixture(scope="session")
def smollm_fp32() -> LoadedModel:
    """The bundled model with the exact prefill path (blocks expanded to fp32, fp32 GEMM) wherever the product path
    would be bf16: what the tests that hold the engine to fp32 references use."""
    return load_model(gemm=FP32)


@pytest.fixture(scope="session")
def smollm_dense() -> LoadedModel:
    return load_model(use_kernels=False)


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((DATA / "reference_smollm2.json").read_text())


def fp32_cache(loaded: LoadedModel, capacity: int = 256) -> DenseKVCache:
    """A lossless cache, for equivalence tests that should differ only by arithmetic order."""
    return DenseKVCache(KVSpec.from_config(loaded.config), capacity, dtype=torch.float32)
