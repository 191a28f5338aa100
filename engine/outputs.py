"""Boundary types between the engine's layers.

The chain of one step:

    Scheduler.schedule()            -> SchedulerOutput   (which tokens of which requests)
    ModelRunner.execute()           -> ModelOutput       (sampled tokens, logprobs, NPU trace)
    Scheduler.update_from_output()  -> list[TokenUpdate] (new tokens, finished requests)
    EngineCore (detokenize, stops)  -> list[RequestOutput] (what clients see)

All are frozen; none holds torch tensors, so the scheduler side stays pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.request import FinishReason
from engine.spec.types import Draft
from engine.stats import RequestMetrics


@dataclass(frozen=True)
class ScheduledChunk:
    """A contiguous run of one request's tokens computed this step.

    A decode is a chunk of one token at the end of the sequence; a prefill chunk covers part of
    the prompt (or of prompt + outputs after a preemption); a verify is a decode followed by the
    request's draft tokens (engine.spec: a token tree whose nodes take the slots after the last
    token, and the real positions last + depth). Which one it is is derived, not stored.
    """

    request_id: str  # whose tokens
    start_pos: int  # position of the first token (= num_computed_tokens before the step)
    token_ids: tuple[int, ...]  # the tokens fed to the model: known tokens, then draft nodes
    block_ids: tuple[int, ...]  # the request's whole block table, covering start_pos + num_tokens
    sample: bool  # True when the chunk reaches the last known token: a new token is sampled
    draft_parents: tuple[int, ...] = ()  # the last len(draft_parents) tokens are draft nodes;
    #   parent node index of each (-1 = the last known token); empty = no speculation

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft_parents)

    @property
    def num_known_tokens(self) -> int:
        """Tokens of the sequence itself (not drafts): what the step surely computes."""
        return len(self.token_ids) - len(self.draft_parents)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once this chunk is written (the causal horizon)."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """What one engine step computes: chunks in batch order, within the token budget."""

    chunks: tuple[ScheduledChunk, ...]  # running requests first, then newly admitted ones
    preempted_ids: tuple[str, ...] = ()  # requests whose KV was dropped this step (recompute)
    finished_ids: tuple[str, ...] = ()  # requests finished since the last step (free their state)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_sampled(self) -> int:
        return sum(c.sample for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @staticmethod
    def make_empty(finished_ids: tuple[str, ...] = ()) -> SchedulerOutput:
        return SchedulerOutput(chunks=(), finished_ids=finished_ids)


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one sampled token and the most likely alternatives."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability under the model's raw distribution (before sampling
    #   transforms: bias, penalties, temperature), as vLLM reports by default
    rank: int  # 1 = it was the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class ModelOutput:
    """What the model runner returns for one step: one entry per chunk with `sample=True`."""

    sampled_token_ids: dict[str, tuple[int, ...]]  # request id -> new tokens: one per decode;
    #   after a verify, the accepted draft tokens and then one bonus (or correction) token
    logprobs: dict[str, tuple[TokenLogprob, ...]] = field(default_factory=dict)  # when asked
    trace: Any = None  # npu_sim StepTrace of the step (Any: the scheduler never looks at it)
    drafts: dict[str, Draft] = field(default_factory=dict)  # request id -> tokens proposed for
    #   its next step (tokens and parents only), for requests that sampled this step


@dataclass(frozen=True)
class TokenUpdate:
    """What one step changed for one request, as the scheduler sees it (no text yet)."""

    request_id: str  # whose tokens
    new_token_ids: tuple[int, ...]  # appended to the request's output this step
    new_logprobs: tuple[TokenLogprob, ...] | None  # matching logprobs, when asked for
    finish_reason: FinishReason | None  # set once, when the request finished this step


@dataclass(frozen=True)
class RequestOutput:
    """A delta of one request's generation, as clients see it."""

    request_id: str  # the engine's id
    new_token_ids: tuple[int, ...]  # tokens added since the last output
    new_text: str  # text added since the last output (stop strings excluded)
    new_logprobs: tuple[TokenLogprob, ...] | None  # per new token, when asked for
    finish_reason: FinishReason | None  # None while generating
    num_prompt_tokens: int  # prompt length
    num_output_tokens: int  # generated tokens so far (including these)
    metrics: RequestMetrics | None = None  # latencies on both clocks, on the finished output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
