"""Plain per-step statistics the engine emits; only `server/metrics.py` turns them into series.

Nothing here imports prometheus_client: the engine records numbers, the server exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The simulated NPU's meta primitives (npu_sim.tasks.Primitive values; a test keeps the two
# equal), named here so that stat consumers can list them without loading the simulator.
NPU_PRIMITIVES = ("vector", "gemm", "attention", "collective")


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's queues and KV cache, taken after a step."""

    num_running_reqs: int  # requests in the running batch (admitted, holding KV blocks)
    num_waiting_reqs: int  # requests queued for admission, preempted ones included
    kv_cache_usage: float  # fraction of KV blocks in use, in [0, 1]
    num_preemptions: int  # preemptions since the scheduler started (cumulative, a counter)
    num_free_blocks: int  # KV blocks free right now
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache
    #   (cumulative, a counter; 0 with prefix caching off)
    prefix_cache_hits: int = 0  # of those, tokens found cached and not recomputed (cumulative)


@dataclass(frozen=True)
class RequestMetrics:
    """Latencies of one finished request on both clocks (wall seconds and simulated NPU seconds).

    Wall times are what this CPU took; simulated times are what the cost model says the NPU
    would take for the same steps (each step's simulated time, plus its modelled host overhead).
    """

    queue_s: float  # wall: arrival -> first scheduled
    ttft_s: float  # wall: arrival -> first token
    e2e_s: float  # wall: arrival -> finished
    ttft_sim_s: float  # simulated: arrival -> first token
    e2e_sim_s: float  # simulated: arrival -> finished
    num_prompt_tokens: int  # prompt length
    num_output_tokens: int  # tokens generated
    queue_sim_s: float = 0.0  # simulated: arrival -> the start of its first step
    prefill_s: float = 0.0  # wall: first scheduled -> first token (vLLM's prefill time)
    decode_s: float = 0.0  # wall: first token -> last token
    inference_s: float = 0.0  # wall: first scheduled -> last token

    @property
    def tpot_s(self) -> float:
        """Wall time per output token after the first (0 with one token)."""
        return (self.e2e_s - self.ttft_s) / max(1, self.num_output_tokens - 1)

    @property
    def tpot_sim_s(self) -> float:
        return (self.e2e_sim_s - self.ttft_sim_s) / max(1, self.num_output_tokens - 1)


@dataclass(frozen=True)
class FinishedRequestStats:
    """One request that finished this step."""

    finish_reason: str  # "stop" | "length" | "abort" | "error"
    metrics: RequestMetrics  # its latencies
    max_tokens: int = 0  # the most tokens it was allowed (max_tokens, or what max_model_len
    #   left after its prompt)
    n: int = 1  # choices its API call asked for (it is one of them)


@dataclass(frozen=True)
class SpecDecodingStats:
    """One step's speculative decoding, summed over its verify chunks (vLLM's counters)."""

    num_drafts: int  # verify chunks (one per request that had drafts verified)
    num_draft_tokens: int  # draft tokens (tree nodes) verified
    num_accepted_tokens: int  # of those, accepted (the bonus token is not counted)
    num_accepted_tokens_per_pos: tuple[int, ...]  # [i]: drafts whose accepted path reached
    #   depth i + 1 (length num_speculative_tokens)


@dataclass(frozen=True)
class GrammarStats:
    """Structured-output grammars compiled or found cached since the last step."""

    compile_s: tuple[float, ...]  # wall seconds of each compile (cache misses)
    num_cache_hits: int  # constraints found compiled already

    @property
    def num_queries(self) -> int:
        return len(self.compile_s) + self.num_cache_hits


@dataclass(frozen=True)
class IterationStats:
    """What one engine step did, on both clocks. Emitted once per step."""

    num_prompt_tokens: int  # prompt (prefill) tokens computed this step, recomputation included
    num_generation_tokens: int  # tokens sampled this step
    num_preempted_reqs: int  # requests preempted this step
    step_s: float  # wall seconds the step took
    step_sim_s: float  # simulated NPU seconds of the step (0 when nothing ran)
    ttfts_s: tuple[float, ...]  # wall TTFT of each request whose first token came this step
    ttfts_sim_s: tuple[float, ...]  # the same on the simulated clock
    inter_token_latencies_s: tuple[float, ...]  # wall gap since each request's previous token
    inter_token_latencies_sim_s: tuple[float, ...]  # the same on the simulated clock
    finished: tuple[FinishedRequestStats, ...]  # requests that finished this step
    trace: Any = None  # the step's npu_sim StepTrace (None when nothing ran)
    spec: SpecDecodingStats | None = None  # verify chunks of the step; None when none ran
    grammar: GrammarStats | None = None  # grammars compiled since the last step; None: none

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generation_tokens
