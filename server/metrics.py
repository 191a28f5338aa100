"""Prometheus metrics: with server.histograms (its histograms), the only module that imports
prometheus_client (server.metric_groups builds groups of series from the factories it passes
in).

One registry per server; every name has the `xyserve:` prefix and every series the `model_name`
label. Names follow vLLM's (DESIGN section 7), then the simulated NPU's own on its clock:

    gauges      num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1)
                npu_padding_waste_ratio (of the latest step that ran on the NPU)
    counters    prompt_tokens_total, generation_tokens_total, num_preemptions_total,
                request_success_total{finished_reason}, npu_hbm_bytes_total,
                npu_kernel_seconds_total{primitive} (simulated seconds; DESIGN's
                `npu_kernel_seconds`, with the `_total` every Prometheus counter carries),
                npu_host_seconds_total (simulated seconds of the serving stack's modelled host
                overhead, npu_sim.host: the host's share of NPU step time over a window is
                rate(npu_host_seconds_total) / rate(npu_step_seconds_sum))
                prefix_cache_queries_total, prefix_cache_hits_total (tokens; hit rate =
                rate(hits) / rate(queries)), structured_output_cache_queries_total,
                structured_output_cache_hits_total (grammars found compiled)
    info        cache_config_info{block_size, num_gpu_blocks, cache_dtype,
                enable_prefix_caching} = 1 (vLLM's label names; "gpu" blocks are the KV pool's)
    histograms  wall clock: time_to_first_token_seconds, inter_token_latency_seconds,
                e2e_request_latency_seconds, request_queue_time_seconds,
                request_prefill_time_seconds, request_decode_time_seconds,
                request_inference_time_seconds, structured_output_compile_seconds;
                per finished request: request_prompt_tokens, request_generation_tokens,
                request_params_max_tokens (1-2-5 buckets up to max_model_len), request_params_n;
                simulated NPU clock: npu_time_to_first_token_seconds,
                npu_inter_token_latency_seconds, npu_e2e_request_latency_seconds, npu_step_seconds;
                per step: iteration_tokens_total, npu_cube_utilization, npu_vector_utilization
    process     process_resident_memory_bytes, process_virtual_memory_bytes,
                process_cpu_seconds_total, process_open_fds, ... (the standard series, of the
                HTTP front end) and, where the engine runs in a process of its own (`xyserve
                serve`: engine.core_process), the same series of that process, named
                xyserve:engine_process_* (its weights and KV cache are there)
    speculative decoding (only when the engine drafts; vLLM's spec_decode_* counters):
                spec_decode_num_drafts_total, spec_decode_num_draft_tokens_total,
                spec_decode_num_accepted_tokens_total,
                spec_decode_num_accepted_tokens_per_pos_total{position="0".."k-1"}

HTTP, without prefix or model label (as vLLM's, from prometheus-fastapi-instrumentator):
http_requests_total{handler, method, status} (handler: the route's path template; every status,
400 / 413 / 429 / 503 included) and http_request_duration_seconds{handler, method}; /metrics
itself is left out. The standard process_* series (prometheus_client's ProcessCollector: CPU
seconds, resident and virtual memory, open file descriptors, start time), unprefixed.

The engine hands its plain per-step stats to `ServerMetrics.record` (a stat logger of the
AsyncEngine, called after every step on the thread that hears the engine loop; prometheus_client
is thread-safe);
nothing is recorded from inside the scheduler or per HTTP call. Queue and KV-cache gauges are read
from the engine's SchedulerStats when scraped, so they are current even while the engine idles.

Speculative decoding, over any window: draft acceptance rate = rate(accepted_tokens) /
rate(draft_tokens); mean accepted length = 1 + rate(accepted_tokens) / rate(drafts) (tokens a
verify chunk yields, the bonus token included); acceptance at position i = rate(per_pos{i}) /
rate(drafts), the fraction of drafts whose accepted path reached depth i + 1.

Utilizations are histograms, one observation per step that ran on the NPU, so a dashboard gets
both the mean over a window (`rate(_sum) / rate(_count)`) and quantiles; a gauge would show
whichever step happened to precede the scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

from engine.config import SpeculativeConfig
from engine.request import FinishReason
from engine.stats import NPU_PRIMITIVES, IterationStats, SchedulerStats
from server.histograms import StepHistogram
from server.metric_groups import Children, RequestHistograms, SpecDecodingCounters

PREFIX = "xyserve:"

# One latency bucket set for both clocks, so wall and NPU panels read alike: a 1-2-5 series from
# 100 us (a simulated decode step of a small model) to 5000 s (a long request in a deep queue on
# a CPU), which bounds a quantile's interpolation error to the 2-2.5x width of one bucket.
LATENCY_BUCKETS_S = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
)
# Tokens scheduled in one step (vLLM's iteration_tokens_total buckets).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Fractions in [0, 1]: 1-2-5 steps below 0.1 (a small model's decode batch keeps the vector
# units ~0.04% busy and the cube units ~1%), then tenths.
UTILIZATION_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                       0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Choices per call (vLLM's request_params_n buckets).
N_BUCKETS = (1, 2, 5, 10, 20)
# Grammar compile times: llguidance compiles a schema in ~1 ms, a large one in tens.
COMPILE_BUCKETS_S = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                     0.5, 1.0, 2.0, 5.0)
HTTP_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})

# No `*_created` series beside every counter and histogram (vLLM drops them too): they double the
# output and no dashboard reads them. (A process-wide switch; this is the only module using the
# library.)
disable_created_metrics()


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The server's registry, fed by the engine's stats.

    Args:
        model_name: value of the `model_name` label (the served name).
        read_stats: returns the engine's latest SchedulerStats; called on every scrape.
        speculative_config: the engine's; the spec_decode_* families exist only when it names a
            drafter (as in vLLM), their positions 0..num_speculative_tokens-1 exported at 0.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, read_stats: Callable[[], SchedulerStats],
                 speculative_config: SpeculativeConfig | None = None, max_model_len: int = 8192,
                 cache_config: Mapping[str, str] | None = None,
                 engine_pid: int | None = None) -> None:
        """max_model_len: the top of the token-count histograms' buckets; cache_config: the
        labels of cache_config_info (None: not exported); engine_pid: the engine's process,
        where it is not this one (its process_* series as xyserve:engine_process_*)."""
        self.registry = r = CollectorRegistry()
        self._read_stats = read_stats
        m = (model_name,)  # the label values every child gets
        labels = ("model_name",)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(*m)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(*m)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> StepHistogram:
            return StepHistogram(PREFIX + name, doc, labels, m, buckets, registry=r)

        # Children are looked up once: the engine thread records a step with no dict lookups.
        self._running = gauge("num_requests_running",
                              "Requests in the running batch (holding KV blocks).")
        self._waiting = gauge("num_requests_waiting",
                              "Requests queued for admission (preempted ones included).")
        self._kv_usage = gauge("kv_cache_usage_perc",
                               "Fraction of KV-cache blocks in use (1 = full).")
        self._prompt_tokens = counter(
            "prompt_tokens", "Prompt tokens computed (prefill; recomputed after a preemption).")
        self._generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._preemptions = counter("num_preemptions", "Requests preempted (KV blocks reclaimed).")
        success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                          (*labels, "finished_reason"), registry=r)
        # Every known label value is exported (at 0) from the start, as vLLM does.
        self._success = Children(success, m, (reason.value for reason in FinishReason))

        self._ttft = histogram("time_to_first_token_seconds",
                               "Wall seconds from arrival to the first token.", LATENCY_BUCKETS_S)
        self._itl = histogram("inter_token_latency_seconds",
                              "Wall seconds between consecutive tokens of a request.",
                              LATENCY_BUCKETS_S)
        self._e2e = histogram("e2e_request_latency_seconds",
                              "Wall seconds from arrival to finish (any finish reason).",
                              LATENCY_BUCKETS_S)
        self._queue = histogram("request_queue_time_seconds",
                                "Wall seconds from arrival to the first step that scheduled it.",
                                LATENCY_BUCKETS_S)
        self._iteration_tokens = histogram("iteration_tokens_total",
                                           "Tokens scheduled per engine step (prompt + decode).",
                                           ITERATION_TOKENS_BUCKETS)

        self._npu_ttft = histogram("npu_time_to_first_token_seconds",
                                   "Simulated NPU seconds from arrival to the first token.",
                                   LATENCY_BUCKETS_S)
        self._npu_itl = histogram("npu_inter_token_latency_seconds",
                                  "Simulated NPU seconds between consecutive tokens of a request.",
                                  LATENCY_BUCKETS_S)
        self._npu_e2e = histogram("npu_e2e_request_latency_seconds",
                                  "Simulated NPU seconds from arrival to finish.",
                                  LATENCY_BUCKETS_S)
        self._npu_step = histogram("npu_step_seconds",
                                   "Simulated NPU seconds of an engine step (kernels + host "
                                   "overhead).", LATENCY_BUCKETS_S)
        self._npu_cube = histogram("npu_cube_utilization",
                                   "Per step: cube active cycles / (AI cores x step cycles).",
                                   UTILIZATION_BUCKETS)
        self._npu_vector = histogram("npu_vector_utilization",
                                     "Per step: vector active cycles / (vector cores x step "
                                     "cycles).", UTILIZATION_BUCKETS)
        self._npu_hbm = counter("npu_hbm_bytes", "Bytes the simulated NPU moved to and from HBM.")
        self._npu_padding = gauge("npu_padding_waste_ratio",
                                  "Fraction of issued cube MACs spent on padding, in the latest "
                                  "step that ran on the NPU.")
        self._npu_host = counter("npu_host_seconds",
                                 "Simulated seconds of host and runtime overhead the serving "
                                 "stack's profile adds to NPU steps (npu_step_seconds minus "
                                 "kernel time).")
        kernel = Counter(PREFIX + "npu_kernel_seconds",
                         "Simulated NPU seconds spent in kernels, by meta primitive.",
                         (*labels, "primitive"), registry=r)
        self._npu_kernel = Children(kernel, m, NPU_PRIMITIVES)
        self._prefix_queries = counter("prefix_cache_queries",
                                       "Prompt tokens looked up in the prefix cache.")
        self._prefix_hits = counter("prefix_cache_hits",
                                    "Prompt tokens found in the prefix cache (not recomputed).")
        self._prefix_seen = (0, 0)  # the scheduler's cumulative (queries, hits) recorded so far
        self._requests = RequestHistograms(histogram, buckets_1_2_5(max_model_len), N_BUCKETS,
                                           LATENCY_BUCKETS_S)
        self._grammar_compile = histogram("structured_output_compile_seconds",
                                          "Wall seconds to compile a structured output's grammar "
                                          "(cache misses).", COMPILE_BUCKETS_S)
        self._grammar_queries = counter("structured_output_cache_queries",
                                        "Structured outputs looked up in the grammar cache.")
        self._grammar_hits = counter("structured_output_cache_hits",
                                     "Structured outputs whose grammar was compiled already.")
        if cache_config is not None:
            info = Gauge(PREFIX + "cache_config_info", "The KV cache's configuration.",
                         (*labels, *cache_config), registry=r)
            info.labels(*m, *cache_config.values()).set(1)
        self._http_requests = Counter("http_requests_total", "HTTP requests by handler and "
                                      "status.", ("handler", "method", "status"), registry=r)
        self._http_seconds = Histogram("http_request_duration_seconds", "Wall seconds from an "
                                       "HTTP request to the end of its response.",
                                       ("handler", "method"), buckets=LATENCY_BUCKETS_S,
                                       registry=r)
        ProcessCollector(registry=r)  # process_* (CPU, memory, file descriptors), as vLLM's
        if engine_pid is not None:
            ProcessCollector(namespace=PREFIX + "engine", pid=lambda: engine_pid, registry=r)
        def by_position(name: str, doc: str) -> Children:
            parent = Counter(PREFIX + name, doc, (*labels, "position"), registry=r)
            return Children(parent, m, (str(i) for i in range(spec_tokens)))

        spec_tokens = speculative_config.num_speculative_tokens if speculative_config else 0
        self._spec = (SpecDecodingCounters(counter, by_position)
                      if speculative_config is not None and speculative_config.enabled else None)

    def record(self, scheduler_stats: SchedulerStats, stats: IterationStats) -> None:
        """Record one engine step: the AsyncEngine's stat logger (runs on the engine thread)."""
        # (gauges are read when scraped, `render`, fresher than these stats)
        queries, hits = scheduler_stats.prefix_cache_queries, scheduler_stats.prefix_cache_hits
        seen_queries, seen_hits = self._prefix_seen
        if queries > seen_queries or hits > seen_hits:
            self._prefix_queries.inc(queries - seen_queries)
            self._prefix_hits.inc(hits - seen_hits)
            self._prefix_seen = (queries, hits)
        self._prompt_tokens.inc(stats.num_prompt_tokens)
        self._generation_tokens.inc(stats.num_generation_tokens)
        self._preemptions.inc(stats.num_preempted_reqs)
        if stats.num_scheduled_tokens:
            self._iteration_tokens.observe(stats.num_scheduled_tokens)
        self._ttft.observe_many(stats.ttfts_s)
        self._npu_ttft.observe_many(stats.ttfts_sim_s)
        self._itl.observe_many(stats.inter_token_latencies_s)
        self._npu_itl.observe_many(stats.inter_token_latencies_sim_s)
        for finished in stats.finished:
            self._success.get(finished.finish_reason).inc()
            self._e2e.observe(finished.metrics.e2e_s)
            self._queue.observe(finished.metrics.queue_s)
            self._npu_e2e.observe(finished.metrics.e2e_sim_s)
            self._requests.record(finished)
        if stats.grammar is not None:
            self._grammar_queries.inc(stats.grammar.num_queries)
            self._grammar_hits.inc(stats.grammar.num_cache_hits)
            self._grammar_compile.observe_many(stats.grammar.compile_s)
        trace = stats.trace
        if trace is not None:  # the step ran on the simulated NPU
            self._npu_step.observe(trace.sim_s)
            self._npu_cube.observe(trace.cube_utilization)
            self._npu_vector.observe(trace.vector_utilization)
            self._npu_hbm.inc(trace.hbm_bytes)
            self._npu_host.inc(trace.host_s)
            self._npu_padding.set(trace.padding_waste_ratio)
            for primitive, seconds in trace.kernel_s_by_primitive.items():
                self._npu_kernel.get(primitive).inc(seconds)
        if stats.spec is not None and self._spec is not None:  # verify chunks ran this step
            self._spec.record(stats.spec)

    def declare_http_handlers(self, handlers: Iterable[tuple[str, str]]) -> None:
        """Start http_request_duration_seconds at zero for these (handler, method) pairs, so that
        Prometheus sees a route's first requests as an increase (a series born with counts in it
        shows no rate until it changes again)."""
        for handler, method in handlers:
            if method in HTTP_METHODS:
                self._http_seconds.labels(handler, method)

    def record_http(self, handler: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered (any thread; the event loop's middleware calls it)."""
        method = method if method in HTTP_METHODS else "other"  # bounded label values
        self._http_requests.labels(handler, method, str(status)).inc()
        self._http_seconds.labels(handler, method).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition, with the gauges refreshed from the engine now."""
        stats = self._read_stats()
        self._running.set(stats.num_running_reqs)
        self._waiting.set(stats.num_waiting_reqs)
        self._kv_usage.set(stats.kv_cache_usage)
        return generate_latest(self.registry)
