"""OpenAI request schemas (pydantic v2), as vLLM accepts them.

FastAPI validates bodies against these models and publishes them in the OpenAPI schema. Unknown
fields are ignored (as OpenAI and vLLM do); fields we know but do not implement (suffix, beam
search, ...) are rejected with a 400 naming the field, rather than silently ignored. Structured
outputs and tools have their schemas in protocol_structured.py.
Value ranges of the sampling fields are published in the schema (engine.request.BOUNDS, so
clients and fuzzers see them) and checked once, by `engine.SamplingParams`; what needs the model
(lengths, token ids within the vocabulary) is checked by the engine when a request is queued.
Sizes that bound the work one request can cause (n, stop strings, logit_bias entries) are capped
here, and floats must be finite (JSON's NaN / Infinity extensions are refused).
Response schemas live in protocol_responses.py.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

from engine.request import BOUNDS, SamplingParams
from engine.structured import StructuredOutputs
from server.protocol_structured import (
    MAX_CHOICES,
    MAX_TOOLS,
    ChatTool,
    ResponseFormat,
    StructuredOutputsRequest,
    ToolCall,
    ToolChoice,
)

MAX_STOP_STRINGS = 16  # stop strings per request at most
MAX_STOP_STRING_CHARS = 1024  # characters per stop string at most
MAX_STOP_TOKEN_IDS = 1024  # stop_token_ids entries at most
MAX_LOGIT_BIAS = 1024  # logit_bias entries at most (each costs sampler work every step)


# Strict types, as OpenAI's API: "16", 2.0 and true are not integers, "0.5" and true not numbers,
# 1 and "true" not booleans (pydantic's lax mode would convert them). Ints are numbers.
Int = StrictInt
Float = Annotated[float, Strict()]
Bool = StrictBool

TokenId = Annotated[StrictInt, Field(ge=0)]  # below the model's vocab_size, checked when served

Bias = Annotated[float, Strict(), Field(json_schema_extra=BOUNDS["logit_bias"].json_schema())]
#   a logit_bias value; its range is checked by SamplingParams


TOKEN_ID_SLICE = 65536  # token ids type-checked per C call (~1 ms with the GIL held)
TOKEN_LISTS_SLICE = 1024  # token-id lists joined for one such check
MODEL_LIST_SLICE = 1024  # list items (chat messages) validated per pydantic call (~5 ms)


def token_id_lists(value: Any, handler: ValidatorFunctionWrapHandler,
                   info: ValidationInfo) -> Any:
    """Validator of a field that may hold token ids (one list of them, or a list of lists):
    those lists are checked here, a slice at a time, as pydantic would check list[TokenId]
    (integers, not booleans, at least 0); anything else goes to pydantic (`handler`).

    One pydantic call over 1.35 M ids holds the GIL for ~0.4 s, a stall of the event loop even
    from a worker thread; between slices the GIL changes hands.
    """
    if isinstance(value, list) and value:
        if type(value[0]) is int:
            _check_token_ids(value, info.field_name)
            return value
        if all(type(v) is list for v in value) and any(v and type(v[0]) is int for v in value):
            for start in range(0, len(value), TOKEN_LISTS_SLICE):
                lists = value[start:start + TOKEN_LISTS_SLICE]
                _check_token_ids(list(itertools.chain.from_iterable(lists)), info.field_name)
            return value
    return handler(value)


def in_slices(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    """Validator of a long list of models (chat messages): pydantic validates it a slice at a
    time, for the reason token_id_lists gives (120,000 messages in one call: ~0.7 s)."""
    if not isinstance(value, list) or len(value) <= MODEL_LIST_SLICE:
        return handler(value)
    items: list[Any] = []
    for start in range(0, len(value), MODEL_LIST_SLICE):
        try:
            items.extend(handler(value[start:start + MODEL_LIST_SLICE]))
        except ValidationError as exc:  # name the item by its index in the whole list
            error = exc.errors()[0]
            loc = list(error["loc"])
            if loc and isinstance(loc[0], int):
                loc[0] += start
            where = ".".join(str(part) for part in loc)
            raise ValueError(f"{info.field_name} item {where}: {error['msg']}") from None
    return items


def _check_token_ids(ids: list[Any], field: str | None) -> None:
    for start in range(0, len(ids), TOKEN_ID_SLICE):
        chunk = ids[start:start + TOKEN_ID_SLICE]
        if not set(map(type, chunk)) <= {int}:  # exactly int: True is not a token id
            bad = next(t for t in chunk if type(t) is not int)
            raise ValueError(f"{field} must be a string, a list of strings or of token ids "
                             f"(integers), or a list of token-id lists; got {str(bad)[:40]!r} "
                             f"among the token ids")
        if min(chunk, default=0) < 0:
            raise ValueError(f"{field} holds a negative token id ({min(chunk)})")


def ranged(name: str, default: Any = None) -> Any:
    """A field whose range engine.request.BOUNDS[name] states: published in the schema here,
    enforced by SamplingParams (once, with a message naming the field)."""
    return Field(default=default, json_schema_extra=BOUNDS[name].json_schema())


class OpenAIBaseModel(BaseModel):
    # Unknown fields are ignored, like OpenAI's API; NaN and Infinity are not numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _reject_if_set(cls: type, value: Any, info: ValidationInfo) -> Any:
    """Validator for fields we know of but do not implement: any non-empty value is a 400."""
    if value not in (None, False, [], {}):
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


class StreamOptions(OpenAIBaseModel):
    include_usage: Bool = False  # send a last chunk with `choices: []` and `usage`


class GenerationRequest(OpenAIBaseModel):
    """Fields common to /v1/completions and /v1/chat/completions.

    Sampling fields left out (None) take SamplingParams' defaults, the one source of them.
    """

    model: str | None = None  # the served model name; None = the one model this server has
    n: Int = ranged("n", 1)  # completions per prompt
    temperature: Float | None = ranged("temperature")  # 0 = greedy
    top_p: Float | None = ranged("top_p")
    top_k: Int | None = ranged("top_k")  # vLLM extension; 0 or -1 = off
    min_p: Float | None = ranged("min_p")  # vLLM extension
    seed: Int | None = ranged("seed")  # same seed, same tokens (choice i of n uses seed + i)
    stop: str | list[str] | None = None  # stop strings, left out of the text
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    #   vLLM extension
    ignore_eos: Bool | None = None  # vLLM extension
    min_tokens: Int | None = ranged("min_tokens")  # vLLM extension
    presence_penalty: Float | None = ranged("presence_penalty")
    frequency_penalty: Float | None = ranged("frequency_penalty")
    repetition_penalty: Float | None = ranged("repetition_penalty")  # vLLM extension
    include_stop_str_in_output: Bool | None = None  # vLLM extension
    skip_special_tokens: Bool | None = None  # vLLM extension
    logit_bias: dict[int, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)  # token
    #   id (a string in JSON) -> added to logit
    stream: Bool = False  # answer with server-sent events
    stream_options: StreamOptions | None = None  # only with stream=true
    user: str | None = None  # accepted and ignored, as vLLM does
    response_format: ResponseFormat | None = None  # text, json_object or json_schema
    structured_outputs: StructuredOutputsRequest | None = None  # vLLM extension
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, max_length=MAX_CHOICES)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # only llguidance (or "auto")
    use_beam_search: bool | None = None
    guided_whitespace_pattern: str | None = None  # JSON's layout is fixed here

    _reject_common = field_validator("use_beam_search", "guided_whitespace_pattern")(
        classmethod(_reject_if_set))

    @field_validator("guided_decoding_backend")
    @classmethod
    def _llguidance_only(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "llguidance", "guidance"):
            raise ValueError(f"guided_decoding_backend {value!r} is not supported; this server "
                             f"uses llguidance")
        return value

    @field_validator("stop")
    @classmethod
    def _short_stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        strings = [value] if isinstance(value, str) else value or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in strings):
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        return value

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           structured: StructuredOutputs | None = None) -> SamplingParams:
        """The engine's parameters for one completion; structured: the constraint on its text
        (server.structured). Raises ValueError naming a bad field."""
        fields = {
            name: getattr(self, name)
            for name in ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                         "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty",
                         "frequency_penalty", "repetition_penalty", "include_stop_str_in_output",
                         "skip_special_tokens", "logit_bias")
            if getattr(self, name) is not None
        }
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              structured_outputs=structured, **fields)


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    prompt: Annotated[str | list[str] | list[TokenId] | list[list[TokenId]],
                      WrapValidator(token_id_lists)]  # text(s) or token id list(s)
    max_tokens: Int | None = ranged("max_tokens", 16)  # OpenAI's and vLLM's default; None = up
    #   to max_model_len
    echo: Bool = False  # prepend the prompt to the text (and its tokens to the logprobs)
    logprobs: Int | None = ranged("logprobs")  # return the chosen
    #   token's logprob and this many top ones
    best_of: Int | None = None  # only best_of == n (no server-side ranking)
    suffix: str | None = None
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None

    _reject_completion = field_validator("suffix", "prompt_logprobs", "truncate_prompt_tokens")(
        classmethod(_reject_if_set))

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported by this server")
        return value


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]  # images, audio, ... are not supported
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None  # accepted; chat templates of the supported models ignore it
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (then content may be None)
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], WrapValidator(in_slices)] = Field(min_length=1)
    #   the conversation so far
    max_tokens: Int | None = ranged("max_tokens")  # deprecated by OpenAI; None = up to
    #   max_model_len (vLLM)
    max_completion_tokens: Int | None = ranged("max_tokens")  # wins over max_tokens
    logprobs: Bool = False  # return the chosen tokens' logprobs
    top_logprobs: Int | None = ranged("logprobs")  # needs logprobs
    add_generation_prompt: Bool = True  # vLLM extension: end the prompt with the assistant cue
    tools: list[ChatTool] | None = Field(default=None, max_length=MAX_TOOLS)  # functions the
    #   model may call; the chat template shows them to it
    tool_choice: ToolChoice | None = None  # none | auto (the default with tools) | required |
    #   {"type": "function", "function": {"name": ...}}; required and named are enforced
    parallel_tool_calls: Bool | None = None  # False: one call at most (required / auto)
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: Any = None
    prediction: Any = None
    echo: bool = False  # vLLM's chat echo is not implemented

    _reject_chat = field_validator("functions", "function_call", "audio", "prediction",
                                   "echo")(classmethod(_reject_if_set))

    @field_validator("tool_choice")
    @classmethod
    def _needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none") and not info.data.get("tools"):
            raise ValueError("tool_choice needs tools")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None = off, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeCompletionRequest(OpenAIBaseModel):
    """POST /tokenize with a text prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: Bool = True


class TokenizeChatRequest(OpenAIBaseModel):
    """POST /tokenize with chat messages (rendered through the chat template)."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], WrapValidator(in_slices)] = Field(min_length=1)
    add_generation_prompt: Bool = True


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(OpenAIBaseModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: Annotated[list[TokenId], WrapValidator(token_id_lists)]
