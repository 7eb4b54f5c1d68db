"""The API's request and response models (pydantic v2), OpenAI's shapes where OpenAI defines them.

References: OpenAI API reference (completions, chat completions, models, errors); vLLM's
``entrypoints/openai/protocol.py`` for the same idea. Unknown request fields are ignored (``extra="ignore"``);
fields we accept but cannot honour are refused with 400 by :meth:`check_supported`, never silently dropped.
These models also produce ``/openapi.json``.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from scaleswap.runtime.config import SamplingParams
from scaleswap.server.errors import APIError

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop sequences, as OpenAI


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- errors
class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------- shared
class StreamOptions(_Request):
    include_usage: bool = False


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _SamplingRequest(_Request):
    """Fields the two generation endpoints share."""

    model: str = Field(..., description="a tenant id, or the base model's id (see GET /v1/models)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1.0")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="default 1.0")
    n: int = Field(1, ge=1, le=MAX_N, description="number of choices")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="same seed, same request: same text")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int = Field(-1, description="extension: sample from the k most likely tokens (-1: off)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension")
    repetition_penalty: float = Field(1.0, gt=0.0, description="extension")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")

    def _common_checks(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop sequences, got {len(stops)}", param="stop")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias", code="unsupported")
        if self.top_k == 0 or self.top_k < -1:
            raise APIError(400, f"top_k must be -1 (off) or >= 1, got {self.top_k}", param="top_k")

    def _sampling(self, max_tokens: int, logprobs: int | None, n_index: int) -> SamplingParams:
        """SamplingParams of choice ``n_index``: choices of one seeded request get seeds seed, seed+1, ..."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                seed=None if self.seed is None else self.seed + n_index,
                stop=stops,
                ignore_eos=self.ignore_eos,
                repetition_penalty=self.repetition_penalty,
                frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty,
                logprobs=logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ----------------------------------------------------------------------------------------------- completions
class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, token ids, or a batch of either (choices are numbered prompt-major)"
    )
    max_tokens: int | None = Field(16, ge=1, description="default 16, as OpenAI")
    logprobs: int | None = Field(None, ge=0, le=20, description="log probabilities of the top-k tokens per position")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        self._common_checks()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported")
        if self.best_of not in (None, 1, self.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if any(isinstance(x, list) and not x for x in p):
            raise APIError(400, "a token-id prompt must not be empty", param="prompt")
        return list(p)  # type: ignore[arg-type]

    def sampling_params(self, max_tokens: int, n_index: int) -> SamplingParams:
        return self._sampling(max_tokens, self.logprobs, n_index)


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionStreamResponse(CompletionResponse):
    """One server-sent event of a streamed completion (``data: {...}``); the stream ends with ``data: [DONE]``."""


# ----------------------------------------------------------------------------------------------- chat
class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: what the context has left")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        self._common_checks()
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                           code="unsupported")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def sampling_params(self, max_tokens: int, n_index: int) -> SamplingParams:
        k = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, k, n_index)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion; the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


# ----------------------------------------------------------------------------------------------- models
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = Field(None, description="the base model a tenant runs on")
    scale_version: int | None = Field(None, description="the tenant's served scale version (0 = base scales)")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------------------------- tenants
TenantId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class TenantCreateRequest(_Request):
    id: TenantId


class Tenant(_Response):
    id: str
    object: Literal["tenant"] = "tenant"
    created_at: int
    current_version: int = Field(..., description="served scale version (0 = base scales)")
    latest_version: int


class TenantCreated(Tenant):
    api_key: str = Field(..., description="shown once; stored only as a salted hash")


class TenantList(_Response):
    object: Literal["list"] = "list"
    data: list[Tenant]


class TenantDeleted(_Response):
    id: str
    object: Literal["tenant"] = "tenant"
    deleted: bool = True


class ScaleVersion(_Response):
    object: Literal["scale_version"] = "scale_version"
    tenant: str
    version: int
    created_at: int
    size_bytes: int
    sha256: str | None = Field(None, description="of the safetensors blob; null for version 0 (the base scales)")
    source: str
    note: str | None = None
    current: bool


class ScaleVersionList(_Response):
    object: Literal["list"] = "list"
    tenant: str
    current_version: int
    data: list[ScaleVersion]


class RollbackRequest(_Request):
    version: int = Field(..., ge=0, description="an existing version; 0 = the base scales")


# ----------------------------------------------------------------------------------------------- health
class HealthResponse(_Response):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Response):
    status: Literal["ready", "loading", "failed", "draining"]
    model: str | None = None
    detail: str | None = None
