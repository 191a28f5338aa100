"""OpenAI response schemas (pydantic v2): completions, chat, their stream chunks, and the rest.

Field names and nesting follow OpenAI's API reference, so the official SDK parses every one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer


class UsageInfo(BaseModel):
    prompt_tokens: int  # prompt tokens, counted once per prompt (not once per choice)
    completion_tokens: int  # generated tokens over all choices
    total_tokens: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------------- completions


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token of `text`."""

    tokens: list[str] = Field(default_factory=list)  # each token as text
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: echoed prompt
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)  # incl. chosen
    text_offset: list[int] = Field(default_factory=list)  # where each token starts in the text


class CompletionChoice(BaseModel):
    index: int  # prompt-major: choice i of prompt p has index p * n + i
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while streaming


class _UsageWhenSet(BaseModel):
    """Leaves a subclass's `usage` out while it is None, as OpenAI's stream chunks do."""

    @model_serializer(mode="wrap")
    def _drop_null_usage(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class CompletionResponse(_UsageWhenSet):
    id: str  # cmpl-<hex>
    object: Literal["text_completion"] = "text_completion"
    created: int  # unix seconds
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # always set in responses; only in a stream's usage chunk


# ----------------------------------------------------------------------------------------- chat


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # UTF-8 bytes of `token`


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)  # most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ResponseToolCall(BaseModel):
    id: str  # call_<hex>
    type: Literal["function"] = "function"
    function: ResponseFunction


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None  # None when the message is tool calls only
    tool_calls: list[ResponseToolCall] | None = None  # left out when there are none

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str  # chatcmpl-<hex>
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunction(BaseModel):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # the next fragment of the arguments' JSON text

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    index: int  # which call of the choice (its position in message.tool_calls)
    id: str | None = None  # in a call's first delta
    type: Literal["function"] | None = None  # in a call's first delta
    function: DeltaFunction

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None  # only in a choice's first chunk
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None  # OpenAI's streamed calls

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what they set ({"content": "x"}, not "role": null).
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_UsageWhenSet):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None  # only in the include_usage chunk (with choices: [])


# ------------------------------------------------------------------------------- models, tokens


class ModelCard(BaseModel):
    id: str  # the served model name
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "xyserve"
    root: str  # the --model the engine loaded
    max_model_len: int  # vLLM extension: prompt + output tokens at most


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
