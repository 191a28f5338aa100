"""Request state and sampling parameters: the engine's unit of work.

`SamplingParams` is frozen and validated when built; `Request` is the one mutable record the
scheduler owns. Everything a request is (prompt, params) is fixed at arrival; everything it becomes
(status, outputs, computed tokens, blocks) changes only inside the scheduler.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from engine.structured.params import StructuredOutputs

if TYPE_CHECKING:
    from engine.spec.types import Draft


class FinishReason(str, enum.Enum):
    """Why a request ended; the values are OpenAI's `finish_reason` strings."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"  # the engine failed while serving it


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Every status from FINISHED_STOPPED on is a finished one."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    RECEIVING_KV = 3  # admitted, its blocks allocated, its KV arriving from another engine
    FINISHED_STOPPED = 4
    FINISHED_LENGTH_CAPPED = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)

    @staticmethod
    def for_reason(reason: FinishReason) -> RequestStatus:
        return _STATUS_FOR_REASON[reason]


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}
_STATUS_FOR_REASON = {reason: status for status, reason in _FINISH_REASONS.items()}

SPEC_ACCEPTANCE_PRIOR = 0.7  # assumed acceptance rate before a request's first verify
MAX_LOGPROBS = 20  # OpenAI's cap on top alternatives per token
MAX_N = 128  # OpenAI's cap on completions per prompt
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # seeds are 64-bit signed integers (as in vLLM and
#   OpenAI's API); the sampler hashes the whole value into its generator's state
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily


class RequestRejected(ValueError):
    """A request this engine cannot serve as asked; `param` names the field at fault and `code`
    is OpenAI's error code for it (None when OpenAI has none)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric sampling field: [low, high], open at low when low_open;
    None = unbounded. The one statement of each range: SamplingParams enforces it, the HTTP
    schema publishes it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0:
                return "positive" if self.low_open else "non-negative"
            return f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"

    def json_schema(self) -> dict[str, float]:
        """The range as JSON-schema keywords (what OpenAPI clients and fuzzers read)."""
        schema: dict[str, float] = {}
        if self.low is not None:
            schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return schema


def _number(value: float | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"  # ints exactly (seeds' 2**63)


# Field -> its range (logit_bias: each bias value).
BOUNDS: dict[str, Bound] = {
    "n": Bound(1, MAX_N), "max_tokens": Bound(1), "min_tokens": Bound(0),
    "seed": Bound(SEED_MIN, SEED_MAX),
    "temperature": Bound(0), "top_p": Bound(0, 1, low_open=True), "top_k": Bound(-1),
    "min_p": Bound(0, 1), "presence_penalty": Bound(-2, 2), "frequency_penalty": Bound(-2, 2),
    "repetition_penalty": Bound(0, low_open=True), "logprobs": Bound(0, MAX_LOGPROBS),
    "logit_bias": Bound(-100, 100),
}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Defaults follow vLLM / OpenAI.

    Raises ValueError naming the field when a value is out of range.
    """

    n: int = 1  # completions per prompt (the engine fans out n requests)
    max_tokens: int | None = 16  # generated tokens at most; None = until max_model_len
    min_tokens: int = 0  # EOS and stop token ids are ignored before this many tokens
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens below min_p * p(max), in [0, 1]
    seed: int | None = None  # per-request RNG: same seed, same tokens, whatever the batch;
    #   in [-2**63, 2**63 - 1], every bit significant
    stop: tuple[str, ...] = ()  # stop strings; matched on the detokenized text, not emitted
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    ignore_eos: bool = False  # keep generating past EOS
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL-style: divides positive / multiplies negative logits
    #   of tokens in prompt or output; 1 = off
    logprobs: int | None = None  # return the chosen token's logprob plus this many top ones
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to logit
    skip_special_tokens: bool = True  # leave special tokens out of the text
    structured_outputs: StructuredOutputs | None = None  # the output must match this (a JSON
    #   schema, a regex, ...), enforced token by token; None = free text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
        object.__setattr__(self, "logit_bias", MappingProxyType(bias))
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            values = value.values() if name == "logit_bias" else (value,)
            for v in values:
                _check(v is None or bound.holds(v), name, v, f"must be {bound.describe()}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, "must not exceed max_tokens")
        _check(all(s for s in self.stop), "stop", self.stop, "must not contain empty strings")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled to the engine process (engine.core_process): a MappingProxyType does not
        # pickle, so the fields travel as keyword arguments (logit_bias a dict) and
        # __post_init__ checks them again there.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["logit_bias"] = dict(self.logit_bias)
        return (_sampling_params, (values,))

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice `index` of n, each its own request: when seeded, seed + index
        (wrapping around within the 64-bit range), so the choices differ while a seeded call
        still repeats exactly. `n` stays (the engine serves each choice as one sequence; n tells
        the stats how many its call asked for)."""
        if self.seed is None:
            return self
        return replace(self, seed=(self.seed + index - SEED_MIN) % 2**64 + SEED_MIN)

    @property
    def greedy(self) -> bool:
        # Temperatures this small overflow the softmax; like vLLM, treat them as greedy.
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def _sampling_params(values: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**values)


def _check(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{name} {why}, got {value!r}")


@dataclass(eq=False)
class Request:
    """One sequence being generated. Owned and mutated by the scheduler only.

    Token layout: `all_token_ids = prompt_token_ids + output_token_ids`; the KV cache holds entries
    for the first `num_computed_tokens` of them, in the blocks `block_ids` (in order).
    """

    request_id: str  # unique within the engine
    prompt_token_ids: list[int]  # the prompt, tokenized
    sampling_params: SamplingParams  # how to sample and when to stop
    arrival_time: float  # wall clock (time.monotonic) when the engine accepted it
    eos_token_id: int | None = None  # the model's EOS; None = never stops on EOS
    # lifecycle state (a factory, not a class-level default: CPython 3.11 cannot specialize
    # reading an attribute whose class default is an instance of a Python class such as an
    # enum, and the scheduler reads this one per running request per step: ~30 ns each)
    status: RequestStatus = field(default_factory=lambda: RequestStatus.WAITING)
    output_token_ids: list[int] = field(default_factory=list)  # generated so far
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: tuple[int, ...] = ()  # KV blocks, in token order (engine.kv_cache replaces the
    #   tuple when the table changes, so the chunks scheduled from it can share it)
    num_preemptions: int = 0  # times its KV was dropped for recompute
    num_external_tokens: int = 0  # leading tokens whose KV another engine computed (P/D
    #   disaggregation: a prefill engine's prompt): admitted, the request takes blocks for
    #   them and waits in RECEIVING_KV until the transfer lands, then runs from there; a
    #   preemption drops that KV and resets this to 0 (recomputed here). 0 = nothing external
    draft: Draft | None = None  # speculative tokens proposed for its next verify (no probs)
    spec_acceptance: float = SPEC_ACCEPTANCE_PRIOR  # moving average of the fraction of tested
    #   draft positions accepted; decides how many drafts still pay (scheduler)
    grammar: Any = None  # engine.structured CompiledGrammar of sampling_params'
    #   structured_outputs (compiled by EngineCore.add_request); passed on to the runner
    first_stop_output_len: int = 0  # output tokens below which no stop rule can end it
    #   (engine.chunks.first_stop_output_len, set by Scheduler.add_request; 0: check them all)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start_pos: int, end_pos: int) -> tuple[int, ...]:
        """`all_token_ids[start_pos:end_pos]` without concatenating the whole sequence first
        (a chunk or a block of a sequence of thousands)."""
        prompt_ids, num_prompt_tokens = self.prompt_token_ids, len(self.prompt_token_ids)
        if end_pos <= num_prompt_tokens:
            return tuple(prompt_ids[start_pos:end_pos])
        output_ids = self.output_token_ids
        if start_pos >= num_prompt_tokens:
            return tuple(output_ids[start_pos - num_prompt_tokens : end_pos - num_prompt_tokens])
        return (*prompt_ids[start_pos:], *output_ids[: end_pos - num_prompt_tokens])

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def max_num_tokens(self) -> int | None:
        """Prompt plus the most tokens it may generate (None if bounded only by the model)."""
        max_tokens = self.sampling_params.max_tokens
        return None if max_tokens is None else self.num_prompt_tokens + max_tokens
