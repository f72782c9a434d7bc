"""What a caller asks the engine for and what comes back: call requests, results, timings and events.

Owns plain data only. A call either continues a persistent context (LLMS callLLM: one new user turn), runs a
stateless conversation sent whole (OpenAI chat completions without a context; with an SLO it runs elastically),
picks one of several choices elastically (ElastiLM's multiple-choice form), or embeds texts with the tiny LM.
Events flow back through a sink: text deltas, then exactly one CallDone or CallFailed; an embedding call sends one
EmbedDone or CallFailed, a choice call one ChooseDone or CallFailed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmaas.elastic.slo import SloRequest
from llmaas.engine.generate import TextDelta
from llmaas.engine.sampling import SamplingParams
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.records import App, Message
from llmaas.tlm.resident import ResidentTinyLM


@dataclass(frozen=True)
class CallParams:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop takes at most 4 non-empty strings")


@dataclass(frozen=True)
class ContextCall:
    app: App
    context_id: str
    prompt: str
    params: CallParams


@dataclass(frozen=True)
class ChatCall:
    app: App
    messages: tuple[Message, ...]
    params: CallParams
    slo: SloRequest | None = None  # set: ElastiLM picks the sub-model and compresses the system message


@dataclass(frozen=True)
class ChooseCall:
    """ElastiLM's multiple-choice request: the refinable context, the question and the choices (concatenated as
    given, each tokenized on its own), answered by log-likelihood under the sub-model the SLO allows."""

    app: App
    context: str
    question: str
    choices: tuple[str, ...]
    slo: SloRequest


@dataclass(frozen=True)
class EmbedCall:
    """Embed texts with the tiny LM. It goes through the same fair queue as generation (per-app bounds, round-robin)
    and runs on the compute thread, so the two models share one PyTorch thread pool and never compete for cores."""

    app: App
    texts: tuple[str, ...]
    tiny_lm: ResidentTinyLM  # the service's handle: the model loads on the first call that needs it


Call = ContextCall | ChatCall | ChooseCall | EmbedCall


@dataclass(frozen=True)
class CallTimings:
    queue_s: float  # waiting for the compute thread
    switch_s: float  # making the context's KV resident (LLMS switch latency)
    prefill_s: float  # the new prompt's prefill
    ttft_s: float  # arrival to first generated token: queue + switch + prefill + first sample
    decode_tok_s: float
    total_s: float


@dataclass(frozen=True)
class WindowReport:
    """A call whose context passed its limit and slid its attention-sink window (engine/window.py). The retained ids
    were re-prefilled at their new positions during the switch."""

    dropped_tokens: int  # ids that left the window in this call (the text stays in the context's messages)
    truncated_prompt_tokens: int  # of those, ids from the start of this call's prompt (0 unless it alone overflowed)
    total_dropped_tokens: int  # over the context's life


@dataclass(frozen=True)
class CallResult:
    context_id: str | None
    reply: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int  # tokens this call added before the reply
    completion_tokens: int
    context_tokens: int  # the context's length after the call (0 for stateless calls)
    timings: CallTimings
    elastic: dict | None = None  # with an SLO: what ElastiLM chose and what happened (ElasticPlan.report)
    window: WindowReport | None = None  # set when the context's window slid in this call


@dataclass(frozen=True)
class CallDone:
    result: CallResult


@dataclass(frozen=True)
class CallFailed:
    error: LlmaasError


@dataclass(frozen=True)
class EmbedTimings:
    queue_s: float  # waiting for the compute thread
    load_s: float  # loading the tiny LM: on the service's first embedding call only, else ~0 (a lock)
    compute_s: float  # tokenization and the encoder's forward
    total_s: float


@dataclass(frozen=True)
class EmbedResult:
    vectors: torch.Tensor  # [texts, dimensions] float32, unit L2 norm, in input order
    num_tokens: int  # tokens encoded, after truncation
    timings: EmbedTimings


@dataclass(frozen=True)
class EmbedDone:
    result: EmbedResult


@dataclass(frozen=True)
class ChooseResult:
    choice: int
    scores: tuple[float, ...]  # mean token log-probability per choice
    prompt_tokens: int  # LLM tokens read: the kept context, the question and every choice
    elastic: dict  # ElasticPlan.report
    queue_s: float
    total_s: float


@dataclass(frozen=True)
class ChooseDone:
    result: ChooseResult


CallEvent = TextDelta | CallDone | EmbedDone | ChooseDone | CallFailed
