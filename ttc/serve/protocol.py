"""Request and response schemas: the OpenAI API's, with vLLM's extensions, validated once at the edge.

Requests ignore fields they do not know (as vLLM does); fields ttc cannot honour (repetition
penalties, `suffix`, `best_of` > n) are refused with a 400 rather than silently dropped. Test-time
compute rides in a top-level `ttc` object (the openai client's `extra_body={"ttc": {...}}`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ttc.decoder.sampling import SamplingParams

_DROP_NONE = dict(default=None, exclude_if=lambda v: v is None)  # extension fields: absent unless set


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- requests ---------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class TTCOptions(BaseModel):
    """`{"strategy": "self_consistency", "n": 8, "verifier": "self_eval", "budget_tokens": 4096}`: every key
    but these four names a field of the strategy (configs/strategy/<strategy>.yaml)."""

    model_config = ConfigDict(extra="allow")

    strategy: str
    verifier: str | dict[str, Any] | None = None  # a config name, or {"name": ..., field overrides}
    budget_tokens: int | None = Field(None, ge=1)  # the request's Budget(tokens=...): computed tokens
    proposer: dict[str, Any] | None = None  # proposer overrides beyond the sampling fields (step_stop, ...)

    @property
    def strategy_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class _SamplingRequest(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share. None means "the default" (for a ttc
    strategy: its proposer's configured value)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    seed: int | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: no top-k cut
    min_p: float | None = Field(None, ge=0, lt=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: int | None = Field(None, ge=0)
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    ignore_eos: bool = False
    # ttc's extension: each sample's random stream first skips this many draws (a client continuing a
    # branch that has already sampled that many tokens reproduces the local engine's stream exactly)
    ttc_skip_draws: int = Field(0, ge=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ttc: TTCOptions | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v:
            raise ValueError("repetition penalties are not supported by ttc serve; leave it at 0")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stop if s)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=max(0, self.top_k or 0), min_p=self.min_p or 0.0)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # null: to the end of the context
    logprobs: int | None = Field(None, ge=0)  # top-k alternatives per token (0: the token's own logprob)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM: whether a text prompt gets the tokenizer's special tokens (BOS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        ok = isinstance(v, str) or (isinstance(v, list) and (all(isinstance(t, int) and not isinstance(t, bool)
                                                                   for t in v) or all(isinstance(t, (str, list))
                                                                                      for t in v)))
        if not ok:
            raise ValueError("must be a string or a list of token ids")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a string or a list of token ids)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            if any(p.type != "text" for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(p.text or "" for p in v)
        return v

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM: extend the last (assistant) message instead of a new turn

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("messages must not be empty")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses --------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served by the radix prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # sampled tokens, an EOS that ended a sample included (as ttc's ledger counts)
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TTCInfo(BaseModel):
    """What a test-time compute request spent and found."""

    strategy: str
    answer: str | None
    score: float | None = None
    ledger: dict[str, int | float]  # generated, prefill, reused, verifier tokens; forward passes; total tokens
    tree: dict[str, Any]  # nodes, finished, depth, candidates [{answer, score?, votes?}]
    budget_tokens: int | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None  # vLLM: the stop string that matched; null for EOS or length
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = Field(**_DROP_NONE)


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    ttc: TTCInfo | None = Field(**_DROP_NONE)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = Field(**_DROP_NONE)
    ttc: TTCInfo | None = Field(**_DROP_NONE)


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(**_DROP_NONE)
    content: str | None = Field(**_DROP_NONE)


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = Field(**_DROP_NONE)
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = Field(**_DROP_NONE)
    ttc: TTCInfo | None = Field(**_DROP_NONE)


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(**_DROP_NONE)
    ttc: TTCInfo | None = Field(**_DROP_NONE)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "ttc"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
