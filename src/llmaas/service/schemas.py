"""Request and response bodies of the HTTP API, as pydantic models (they also make the published OpenAPI spec).

Owns validation at the edge: strict types, ranges and no unknown fields, so bad input becomes a 400 before it reaches
the engine. The OpenAI models accept OpenAI's own field names and refuse the values llmaas does not implement (n > 1,
penalties, tools, JSON mode, logprobs) with a message that names the parameter. Ignores what the fields do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

MAX_TEXT_CHARS = 200_000
Number = StrictFloat | StrictInt
Text = Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]
StopStrings = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=256)]], Field(max_length=4)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Generation(_Strict):
    """Generation parameters shared by the calls of the contexts API."""

    max_tokens: StrictInt = Field(256, ge=1, le=8192, description="most tokens to generate")
    temperature: Number = Field(0.0, ge=0, le=2, description="0 = greedy")
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0, le=100_000, description="0 = off")
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopStrings = Field(default_factory=list, description="stop before any of these strings")


# -- the contexts API (LLMS: new context, call, get, list, delete) ----------------------------------------------------


class NewContext(_Strict):
    system_prompt: Text | None = None
    overflow: Literal["window", "error"] = Field(
        "window", description="what a call does when the context would pass its maximum length. window: the context "
                              "keeps its first tokens (attention sinks) and its most recent ones, and goes on (the "
                              "reply's `window` says what left); error: the reply is cut (finish_reason "
                              "context_full) and later calls are refused")


class CallBody(Generation):
    prompt: Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    stream: StrictBool = False


class MessageOut(BaseModel):
    role: str
    content: str


class ContextOut(BaseModel):
    id: str
    created_at: float
    updated_at: float
    num_calls: int
    num_tokens: int
    max_tokens: int = Field(description="the most tokens this context may hold: the app's quota, capped by the "
                                        "service's --max-context-tokens and the model")
    state: Literal["resident", "stored"] = Field(description="resident: its KV is in memory; stored: only its text "
                                                             "and token ids are, and the next call rebuilds the KV")
    resident_bytes: int = Field(description="bytes of this context's KV in memory now (0 = not resident)")
    overflow: Literal["window", "error"]
    dropped_tokens: int = Field(description="tokens that left the attention window so far (their messages stay "
                                            "here; num_tokens counts the retained ones)")
    messages: list[MessageOut]


class ContextList(BaseModel):
    data: list[ContextOut]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    context_tokens: int


class TimingsOut(BaseModel):
    queue_s: float
    switch_s: float = Field(description="making the context's KV resident (context-switch latency)")
    prefill_s: float
    ttft_s: float
    decode_tok_s: float
    total_s: float


FINISH_REASON = Field(description="stop: the model ended or a stop string came; length: max_tokens was reached; "
                                  "context_full: a context created with overflow 'error' reached its maximum length, "
                                  "and its next call would be refused (start a new context)")


class WindowOut(BaseModel):
    """Set when the context passed its maximum length in this call and its attention-sink window slid."""

    dropped_tokens: int = Field(description="tokens that left the window in this call (their text stays in the "
                                            "context's messages)")
    truncated_prompt_tokens: int = Field(description="of those, tokens cut from the start of this call's prompt, "
                                                     "which alone did not fit (0 otherwise)")
    total_dropped_tokens: int = Field(description="over the context's life")


class CallOut(BaseModel):
    context_id: str | None
    reply: str
    finish_reason: Literal["stop", "length", "context_full"] = FINISH_REASON
    usage: Usage
    timings: TimingsOut
    window: WindowOut | None = None
    notice: str | None = Field(None, description="what to do next, or what the caller should know: a full context, "
                                                 "a prompt cut to fit the window")


class Deleted(BaseModel):
    id: str
    deleted: bool


# -- OpenAI-compatible chat completions -------------------------------------------------------------------------------


class TextPart(_Strict):
    """One part of a message's content given as a list, as OpenAI clients send it; only text parts are taken."""

    type: StrictStr
    text: Text | None = None
    model_config = ConfigDict(extra="allow")  # image_url, input_audio...: refused by the validator, by name

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are not supported: this model takes text only")
        return v


class ChatMessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is OpenAI's newer name for system, and is treated as system")
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=100)]
    name: StrictStr | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class SloBody(_Strict):
    """A latency SLO (ElastiLM): each of TTFT and TPOT as a fraction of the full model's on the uncompressed prompt
    (1.0 = no constraint) or as an absolute target in milliseconds. At least one of the four."""

    ttft: Number | None = Field(None, gt=0, le=1, description="time to first token, fraction of the full model's")
    tpot: Number | None = Field(None, gt=0, le=1, description="time per output token, fraction of the full model's")
    ttft_ms: Number | None = Field(None, gt=0, le=3_600_000, description="time to first token, milliseconds")
    tpot_ms: Number | None = Field(None, gt=0, le=3_600_000, description="time per output token, milliseconds")

    @model_validator(mode="after")
    def _one_form_each(self) -> SloBody:
        given = [k for k in ("ttft", "tpot", "ttft_ms", "tpot_ms") if getattr(self, k) is not None]
        if not given:
            raise ValueError("an SLO needs ttft or ttft_ms, tpot or tpot_ms")
        for name in ("ttft", "tpot"):
            if getattr(self, name) is not None and getattr(self, f"{name}_ms") is not None:
                raise ValueError(f"give {name} as a fraction or as {name}_ms, not both")
        return self


class LlmaasExtension(_Strict):
    """llmaas's extension (openai client: `extra_body={"llmaas": {...}}`). Either run the chat on a persistent
    context (send only the new user message; the service holds the rest), or give a latency SLO: the chat then runs
    on the elastic sub-model ElastiLM picks, with the first system message as the refinable context it may compress
    and the last user message as the query."""

    context_id: StrictStr | None = None
    slo: SloBody | None = None


class ChatCompletionBody(_Strict):
    model: StrictStr
    messages: Annotated[list[ChatMessageIn], Field(min_length=1, max_length=1000)]
    max_tokens: StrictInt | None = Field(None, ge=1, le=8192)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=8192)
    temperature: Number | None = Field(None, ge=0, le=2, description="default 1, as in OpenAI's API")
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    stop: StrictStr | StopStrings | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    user: StrictStr | None = None
    presence_penalty: Number | None = Field(None, ge=0, le=0, description="only 0 is supported")
    frequency_penalty: Number | None = Field(None, ge=0, le=0, description="only 0 is supported")
    # Accepted so that the refusal names them (rather than "extra inputs are not permitted"); see UNSUPPORTED.
    tools: list | None = Field(None, description="not supported: this service has no tool calling")
    tool_choice: StrictStr | dict | None = Field(None, description="only 'none' is supported")
    parallel_tool_calls: StrictBool | None = None
    functions: list | None = Field(None, description="not supported (deprecated by OpenAI for tools)")
    function_call: StrictStr | dict | None = Field(None, description="only 'none' is supported")
    response_format: dict | None = Field(None, description="only {'type': 'text'} is supported")
    logprobs: StrictBool | None = Field(None, description="only false is supported")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=0, description="only 0 is supported")
    logit_bias: dict | None = Field(None, description="only an empty map is supported")
    llmaas: LlmaasExtension | None = None

    def unsupported(self) -> list[str]:
        """The parameters set to something this service does not implement."""
        inert = {"tools": [None], "tool_choice": [None, "none"], "parallel_tool_calls": [None, False, True],
                 "functions": [None], "function_call": [None, "none"],
                 "response_format": [None, {"type": "text"}], "logprobs": [None, False], "logit_bias": [None, {}]}
        return [name for name, ok in inert.items() if getattr(self, name) not in ok]

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if isinstance(v, str):
            if not v or len(v) > 256:
                raise ValueError("a stop string must have 1 to 256 characters")
            return [v]
        return v


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] = Field(description="length also when the persistent context is full: "
                                                                 "then llmaas.finish_detail says context_full")


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    llmaas: dict = Field(description="context_id and timings of this call; window when a persistent context slid "
                                     "its attention window (see WindowOut); finish_detail and notice when it is full "
                                     "(overflow 'error'), notice when the prompt was cut to fit")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmaas"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- OpenAI-compatible embeddings (the tiny LM) -----------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 256


class EmbeddingsBody(_Strict):
    model: StrictStr = Field(description="the tiny LM's id (GET /v1/models lists it)")
    # Token-id arrays are accepted by the schema so that the refusal can say why (rather than "not a valid string").
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description=f"a string or a list of 1 to {MAX_EMBEDDING_INPUTS} non-empty strings, each of at most "
                    f"{MAX_TEXT_CHARS} characters (a text over 256 tokens is truncated); token-id arrays are refused")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded (as OpenAI does)")
    dimensions: StrictInt | None = Field(None, description="only the model's own (384) is supported")
    user: StrictStr | None = None

    @field_validator("input")
    @classmethod
    def _texts_only(cls, v: str | list) -> str | list:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input is empty: send a string or a list of strings")
        if not all(isinstance(item, str) for item in items):
            raise ValueError("token-id input is not supported: token ids depend on the model's tokenizer, and this "
                             "service tokenizes for you; send the texts")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"{len(items)} inputs is over the limit of {MAX_EMBEDDING_INPUTS} per request")
        for i, item in enumerate(items):
            if not item or len(item) > MAX_TEXT_CHARS:
                raise ValueError(f"input[{i}] must have 1 to {MAX_TEXT_CHARS} characters; it has {len(item)}")
        return v

    @property
    def texts(self) -> tuple[str, ...]:
        """The input as texts (the validator has refused token ids)."""
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or a base64 string with encoding_format=base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens encoded, after truncation")
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    llmaas: dict = Field(description="timings: queue_s, load_s (the tiny LM's load, on the service's first "
                                     "embedding request only), compute_s (summed over the request's engine calls), "
                                     "total_s; engine_calls: how many parts the texts went in")


class ChooseBody(_Strict):
    """ElastiLM's multiple-choice request. The LLM reads context + question + choice, each tokenized on its own and
    concatenated as given (put your own separators, e.g. a context ending in a blank line, a question ending in
    "Answer:" and choices starting with a space). Only the context may be compressed."""

    context: Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]
    question: Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]
    choices: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=4096)]],
                       Field(min_length=2, max_length=128)]
    slo: SloBody


class ChooseOut(BaseModel):
    choice: int = Field(description="index of the most likely choice")
    scores: list[float] = Field(description="mean token log-probability of each choice")
    usage: dict = Field(description="prompt_tokens: LLM tokens read (kept context, question and every choice)")
    llmaas: dict = Field(description="level, prompt_ratio, prompt_tokens_kept, ttft_s, tpot_s (null here), slo_met, "
                                     "tlm_s, the prediction before repair, the budgets and the full model's times, "
                                     "and timings (queue_s, total_s)")
