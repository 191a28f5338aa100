"""Groups of series of server.metrics: vLLM's per-request histograms, the speculative-decoding
counters, and a counter's children by one label. Built from the factories ServerMetrics passes
in, so prometheus_client stays imported by server.metrics alone (types only here)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from engine.stats import FinishedRequestStats, SpecDecodingStats

if TYPE_CHECKING:
    from prometheus_client import Counter

    from server.histograms import StepHistogram


class RequestHistograms:
    """vLLM's per-request histograms, one observation per finished request."""

    def __init__(self, histogram: Callable[[str, str, tuple[float, ...]], StepHistogram],
                 token_buckets: tuple[float, ...], n_buckets: tuple[float, ...],
                 latency_buckets_s: tuple[float, ...]) -> None:
        """histogram(name, doc, buckets): the server's factory of model_name-labelled
        children."""
        tokens = token_buckets
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.",
                                       tokens)
        self.generation_tokens = histogram("request_generation_tokens",
                                           "Tokens generated per request.", tokens)
        self.max_tokens = histogram("request_params_max_tokens",
                                    "max_tokens per request (resolved against max_model_len).",
                                    tokens)
        self.n = histogram("request_params_n", "Choices per API call (n), per request.",
                           n_buckets)
        self.prefill = histogram("request_prefill_time_seconds",
                                 "Wall seconds from a request's first step to its first token.",
                                 latency_buckets_s)
        self.decode = histogram("request_decode_time_seconds",
                                "Wall seconds from a request's first token to its last.",
                                latency_buckets_s)
        self.inference = histogram("request_inference_time_seconds",
                                   "Wall seconds from a request's first step to its last token.",
                                   latency_buckets_s)

    def record(self, finished: FinishedRequestStats) -> None:
        m = finished.metrics
        self.prompt_tokens.observe(m.num_prompt_tokens)
        self.generation_tokens.observe(m.num_output_tokens)
        self.max_tokens.observe(finished.max_tokens)
        self.n.observe(finished.n)
        self.prefill.observe(m.prefill_s)
        self.decode.observe(m.decode_s)
        self.inference.observe(m.inference_s)


class SpecDecodingCounters:
    """vLLM's spec_decode_* counters, fed by each step's SpecDecodingStats."""

    def __init__(self, counter: Callable[[str, str], Counter],
                 by_position: Callable[[str, str], Children]) -> None:
        """counter(name, doc): the server's factory of model_name-labelled counter children;
        by_position(name, doc): the same with a `position` label, one child per draft
        position."""
        self.num_drafts = counter("spec_decode_num_drafts",
                                  "Draft chunks verified (one per request and step with drafts).")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens",
                                        "Draft tokens (tree nodes) verified.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted (the bonus token not counted).")
        self.per_pos = by_position("spec_decode_num_accepted_tokens_per_pos",
                                   "Drafts whose accepted path reached depth position + 1.")

    def record(self, spec: SpecDecodingStats) -> None:
        self.num_drafts.inc(spec.num_drafts)
        self.num_draft_tokens.inc(spec.num_draft_tokens)
        self.num_accepted_tokens.inc(spec.num_accepted_tokens)
        for position, num_drafts in enumerate(spec.num_accepted_tokens_per_pos):
            self.per_pos.get(str(position)).inc(num_drafts)


class Children:
    """The children of a counter with one label beyond `model_name`, made once per value."""

    def __init__(self, parent: Counter, model: tuple[str, ...], values: Iterable[str]) -> None:
        self._parent = parent
        self._model = model
        self._children = {v: parent.labels(*model, v) for v in values}

    def get(self, value: str) -> Counter:
        child = self._children.get(value)
        if child is None:  # a value unknown when the server started: made on first use
            child = self._children[value] = self._parent.labels(*self._model, value)
        return child
