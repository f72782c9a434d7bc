"""Text generation on one KV cache: chunked prefill, then token-by-token decode, streamed.

Owns the generation loop (prefill in chunks, sample, stop on a stop token, a stop string, max_tokens or a full
context), text deltas that hold back a possible stop-string prefix, and the timings of each request. Ignores where
the KV lives beyond the DenseKVCache it is given, and chat formatting (the caller passes token ids).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmaas.engine import cpu_governor
from llmaas.engine.detokenize import IncrementalDecoder
from llmaas.engine.sampling import SamplingParams, make_sampler
from llmaas.errors import ContextLengthError, InvalidRequestError
from llmaas.kv.dense import DenseKVCache
from llmaas.model.lora import ModelLora
from llmaas.model.tokenizer import Tokenizer
from llmaas.model.transformer import DEFAULT_PREFILL_CHUNK_TOKENS, Transformer
from llmaas.model.widths import ModelWidths


@dataclass(frozen=True)
class GenerateRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first occurrence
    stop_token_ids: frozenset[int] | None = None  # None = the model's end-of-generation tokens

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")


@dataclass(frozen=True)
class GenerationTimings:
    prefill_s: float  # prompt processing
    ttft_s: float  # request start to the first generated token
    decode_s: float  # first token to the last
    total_s: float
    prompt_tokens: int
    generated_tokens: int

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (the first is paid for by prefill)."""
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_id: int


@dataclass(frozen=True)
class Finished:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (stop token or string), "length" (max_tokens or context full)
    timings: GenerationTimings


@dataclass
class _StopScanner:
    """Finds stop strings in the generated text and says how much text is safe to emit."""

    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    hit: bool = field(default=False)

    def add(self, delta: str) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += delta
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.hit = self.text[:cut], True
            return self._emit(len(self.text))
        held = max((n for s in self.stops for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        return self._emit(len(self.text) - held)

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return out


class Generator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer,
                 prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS, *, widths: ModelWidths | None = None,
                 lora: ModelLora | None = None) -> None:
        """widths and lora select an elastic sub-model of `model` (None: the full model)."""
        if prefill_chunk_tokens < 1:
            raise InvalidRequestError(f"prefill chunk must be >= 1 token; got {prefill_chunk_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.widths, self.lora = widths, lora

    def generate(self, request: GenerateRequest, cache: DenseKVCache) -> Finished:
        *_, done = self.stream(request, cache)
        assert isinstance(done, Finished)
        return done

    def prefill(self, token_ids: list[int] | tuple[int, ...], cache: DenseKVCache) -> torch.Tensor:
        """Append tokens to the cache in chunks; return the logits of the last one."""
        if cache.num_tokens + len(token_ids) > cache.capacity_tokens:
            raise ContextLengthError(
                f"the prompt has {len(token_ids)} tokens and the context already {cache.num_tokens}, over the "
                f"context limit of {cache.capacity_tokens}; shorten the prompt or raise the context size"
            )
        ids = torch.tensor(token_ids, dtype=torch.int64)
        h = None
        for start in range(0, len(token_ids), self.prefill_chunk_tokens):
            cpu_governor.tick()
            chunk = ids[start:start + self.prefill_chunk_tokens]
            positions = torch.arange(cache.num_tokens, cache.num_tokens + chunk.numel())
            view = cache.append(chunk.numel())
            h = self.model.run_layers(self.model.embed(chunk), positions, view, widths=self.widths, lora=self.lora,
                                      stats=cache.stats_view())
        return self.model.logits(h[-1:])[0]

    def stream(self, request: GenerateRequest, cache: DenseKVCache) -> Iterator[TextDelta | Finished]:
        """Yield a TextDelta per generated token (text may be "" while held back), then one Finished."""
        stops = request.stop_token_ids if request.stop_token_ids is not None else self.tokenizer.special.stop_ids
        sample = make_sampler(request.sampling)
        decoder = IncrementalDecoder(self.tokenizer)
        scanner = _StopScanner(request.stop)
        t0 = time.perf_counter()
        logits = self.prefill(request.prompt_ids, cache)
        t_prefill = time.perf_counter()
        generated: list[int] = []
        reason = "length"
        t_first = t_prefill
        while len(generated) < request.max_tokens:
            token = sample(logits)
            if not generated:
                t_first = time.perf_counter()
            if token in stops:
                reason = "stop"
                break
            generated.append(token)
            delta = scanner.add(decoder.push(token))
            if scanner.hit:
                reason = "stop"
                yield TextDelta(delta, token)
                break
            yield TextDelta(delta, token)
            if len(generated) == request.max_tokens or cache.num_tokens >= cache.capacity_tokens:
                break
            cpu_governor.tick()
            position = torch.tensor([cache.num_tokens])
            view = cache.append(1)
            logits = self.model.forward(torch.tensor([token]), position, view, widths=self.widths, lora=self.lora,
                                        stats=cache.stats_view())[0]
        if not scanner.hit:
            tail = scanner.add(decoder.flush()) + scanner.finish()
            if tail:
                yield TextDelta(tail, generated[-1])
        t_end = time.perf_counter()
        timings = GenerationTimings(t_prefill - t0, t_first - t0, t_end - t_first, t_end - t0, len(request.prompt_ids),
                          len(generated))
        yield Finished(scanner.text, tuple(generated), reason, timings)
