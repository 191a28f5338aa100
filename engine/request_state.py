"""What the engine keeps of a request on the output side: its detokenizer and its timeline.

The scheduler's `Request` knows tokens and blocks; this knows text and time, on both clocks:
wall seconds (time.monotonic) and simulated NPU seconds (the engine's simulated clock).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer
from engine.stats import FinishedRequestStats, RequestMetrics


@dataclass
class RequestState:
    """Output-side state of one unfinished request."""

    detokenizer: IncrementalDetokenizer | None  # text deltas and stop strings; None: no text
    num_prompt_tokens: int  # prompt length
    arrival_s: float  # wall clock when accepted
    arrival_sim_s: float  # simulated clock when accepted
    max_tokens: int = 0  # tokens it may generate at most (for request_params_max_tokens)
    n: int = 1  # choices of its API call (for request_params_n)
    num_output_tokens: int = 0  # tokens generated so far
    first_scheduled_s: float | None = None  # wall clock of its first step
    first_scheduled_sim_s: float | None = None  # simulated clock at the start of its first step
    first_token_s: float | None = None  # wall clock of its first token
    first_token_sim_s: float | None = None  # simulated clock of its first token
    last_token_s: float = 0.0  # wall clock of its latest token
    last_token_sim_s: float = 0.0  # simulated clock of its latest token
    run_start_step: int = 0  # while in a quiet processor's engine.token_runs.TokenRuns: the
    #   first step whose token num_output_tokens and last_token_* do not count yet

    def record_tokens(self, num_new_tokens: int, now_s: float, now_sim_s: float,
                      ) -> tuple[float, float, bool]:
        """Note new tokens at (now_s, now_sim_s); returns the latency they close on both clocks
        (TTFT for the first token, else the inter-token gap) and whether it is the first.
        (OutputProcessor.process inlines the inter-token branch: keep the two alike.)"""
        if self.first_token_s is None:
            self.first_token_s, self.first_token_sim_s = now_s, now_sim_s
            latency_s, latency_sim_s = now_s - self.arrival_s, now_sim_s - self.arrival_sim_s
            first = True
        else:
            latency_s, latency_sim_s = now_s - self.last_token_s, now_sim_s - self.last_token_sim_s
            first = False
        self.num_output_tokens += num_new_tokens
        self.last_token_s, self.last_token_sim_s = now_s, now_sim_s
        return latency_s, latency_sim_s, first

    def metrics(self, now_s: float, now_sim_s: float) -> RequestMetrics:
        """Latencies of the request finishing at (now_s, now_sim_s)."""
        first_token_s = self.first_token_s if self.first_token_s is not None else now_s
        first_token_sim_s = (self.first_token_sim_s if self.first_token_sim_s is not None
                             else now_sim_s)
        scheduled_s = self.first_scheduled_s if self.first_scheduled_s is not None else now_s
        scheduled_sim_s = (self.first_scheduled_sim_s if self.first_scheduled_sim_s is not None
                           else now_sim_s)
        last_token_s = self.last_token_s if self.first_token_s is not None else now_s
        return RequestMetrics(
            queue_s=scheduled_s - self.arrival_s,
            ttft_s=first_token_s - self.arrival_s,
            e2e_s=now_s - self.arrival_s,
            ttft_sim_s=first_token_sim_s - self.arrival_sim_s,
            e2e_sim_s=now_sim_s - self.arrival_sim_s,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            queue_sim_s=scheduled_sim_s - self.arrival_sim_s,
            prefill_s=max(0.0, first_token_s - scheduled_s),
            decode_s=max(0.0, last_token_s - first_token_s),
            inference_s=max(0.0, last_token_s - scheduled_s),
        )

    def finished(self, reason: str, now_s: float, now_sim_s: float) -> FinishedRequestStats:
        """The stats of this request finishing now."""
        return FinishedRequestStats(reason, self.metrics(now_s, now_sim_s), self.max_tokens,
                                    self.n)
