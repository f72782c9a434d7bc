"""The engines `llmaas bench engine` measures, behind one small interface: ours, llama.cpp, HF transformers.

Owns the per-engine mechanics of "prefill these ids into a fresh context" and "then generate n tokens greedily".
Ignores the protocol (which sizes, how many repeats, statistics): engine_worker.py. Peers are optional imports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np


class EngineAdapter(Protocol):
    name: str

    def prefill_s(self, ids: list[int]) -> float:
        """Seconds to process ids in a fresh context, up to the last token's logits."""
        ...

    def decode_s(self, ids: list[int], n: int) -> float:
        """After an untimed prefill of ids, seconds to generate n more tokens greedily, one at a time."""
        ...


class OursAdapter:
    name = "ours"

    def __init__(self, model_path: Path, threads: int | str, *, stats: bool = False, gemm: str = "auto") -> None:
        """`threads`: a count, or "auto" (the service's governor, engine/cpu_governor.py)."""
        import torch

        from llmaas.engine import cpu_governor
        from llmaas.engine.generate import Generator
        from llmaas.model.loader import load_model

        cpu_governor.apply_threads(threads)
        self._tick = cpu_governor.tick
        self._torch = torch
        self.loaded = load_model(model_path, gemm=gemm)
        self._generator = Generator(self.loaded.model, self.loaded.tokenizer)
        self.stats = stats

    def _cache(self, capacity: int):
        from llmaas.kv.dense import DenseKVCache
        from llmaas.kv.spec import KVSpec

        return DenseKVCache(KVSpec.from_config(self.loaded.config), capacity)

    def _forward(self, ids: list[int], cache) -> object:
        from llmaas.model.stats import AttentionStats

        torch = self._torch
        n0 = cache.num_tokens
        view = cache.append(len(ids))
        stats = AttentionStats.zeros(cache.num_tokens) if self.stats else None
        model = self.loaded.model
        h = model.run_layers(model.embed(torch.tensor(ids)), torch.arange(n0, n0 + len(ids)), view, stats=stats)
        return model.logits(h[-1:])[0]

    def prefill_s(self, ids: list[int]) -> float:
        cache = self._cache(len(ids))
        t0 = time.perf_counter()
        if self.stats:
            self._forward(ids, cache)
        else:
            self._generator.prefill(ids, cache)
        return time.perf_counter() - t0

    def decode_s(self, ids: list[int], n: int) -> float:
        cache = self._cache(len(ids) + n)
        logits = self._generator.prefill(ids, cache)
        t0 = time.perf_counter()
        for _ in range(n):
            self._tick()  # as the engine's generator does between tokens
            logits = self._forward([int(logits.argmax())], cache)
        return time.perf_counter() - t0


class LlamaCppAdapter:
    """llama.cpp through llama-cpp-python, on the same GGUF, with the same thread count."""

    name = "llama_cpp"

    def __init__(self, model_path: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False)

    @staticmethod
    def build() -> dict[str, str]:
        """Which llama.cpp build the figures come from: its version and the CPU features it was compiled for (a
        native build and scripts/setup.sh's explicit flags differ, and AMX builds crash on eval here)."""
        import llama_cpp

        return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}

    # eval() drops cached tokens past n_tokens, so reset() (n_tokens = 0) starts a fresh context. With
    # logits_all=False the last token's logits are only in the context's buffer (llama_get_logits).
    def prefill_s(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def decode_s(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        self.llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
            self.llm.eval([int(logits.argmax())])
        return time.perf_counter() - t0


class TransformersAdapter:
    """HF transformers loading the same GGUF (dequantised to fp32), with its own KV cache."""

    name = "transformers"

    def __init__(self, model_path: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                          dtype=torch.float32).eval()

    def prefill_s(self, ids: list[int]) -> float:
        torch = self._torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(torch.tensor([ids]), use_cache=True)
            return time.perf_counter() - t0

    def decode_s(self, ids: list[int], n: int) -> float:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True)
            t0 = time.perf_counter()
            for _ in range(n):
                token = out.logits[0, -1].argmax().reshape(1, 1)
                out = self.model(token, past_key_values=out.past_key_values, use_cache=True)
            return time.perf_counter() - t0
