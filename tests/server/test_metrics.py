"""/metrics counts exactly what was served, on both clocks, from the engine's per-step stats.

An in-process app (fresh registry, so every value is absolute) serves a known sequence of
requests; the counters and histogram counts must then equal what was sent and received. The stat
logger itself is also fed synthetic stats, for what a short run does not produce (preemptions,
aborts, unknown labels).
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.stats import FinishedRequestStats, IterationStats, RequestMetrics, SchedulerStats
from server.app import build_app
from server.config import ServerConfig
from server.memory import resident_bytes
from server.metrics import (
    ITERATION_TOKENS_BUCKETS,
    LATENCY_BUCKETS_S,
    UTILIZATION_BUCKETS,
    ServerMetrics,
)
from tests.server.harness import MakeCore

NAME = "tiny-metrics"
STOP_TOKEN = 1234  # forced by logit_bias and listed in stop_token_ids: finishes with "stop"

# Every family DESIGN section 7 names, as the text exposition types it (counters with `_total`).
FAMILIES = {
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prompt_tokens_total": "counter",
    "generation_tokens_total": "counter",
    "request_success_total": "counter",
    "num_preemptions_total": "counter",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "iteration_tokens_total": "histogram",
    "npu_time_to_first_token_seconds": "histogram",
    "npu_inter_token_latency_seconds": "histogram",
    "npu_e2e_request_latency_seconds": "histogram",
    "npu_step_seconds": "histogram",
    "npu_cube_utilization": "histogram",
    "npu_vector_utilization": "histogram",
    "npu_hbm_bytes_total": "counter",
    "npu_padding_waste_ratio": "gauge",
    "npu_kernel_seconds_total": "counter",
    "npu_host_seconds_total": "counter",
    # vLLM's other series (the list)
    "prefix_cache_queries_total": "counter",
    "prefix_cache_hits_total": "counter",
    "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram",
    "request_params_n": "histogram",
    "request_params_max_tokens": "histogram",
    "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram",
    "cache_config_info": "gauge",
    # structured outputs
    "structured_output_compile_seconds": "histogram",
    "structured_output_cache_queries_total": "counter",
    "structured_output_cache_hits_total": "counter",
}
HTTP_FAMILIES = {"http_requests_total": "counter", "http_request_duration_seconds": "histogram"}
# prometheus_client's ProcessCollector (Linux), unprefixed and without model_name, as vLLM's
PROCESS_FAMILIES = {"process_cpu_seconds_total": "counter",
                    "process_resident_memory_bytes": "gauge",
                    "process_virtual_memory_bytes": "gauge", "process_start_time_seconds": "gauge",
                    "process_open_fds": "gauge", "process_max_fds": "gauge"}
LATENCY_HISTOGRAMS = [name for name, kind in FAMILIES.items()
                      if kind == "histogram" and name.endswith("_seconds")
                      and not name.startswith("structured_output")]

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Scrape:
    """A parsed text exposition: samples by (name, labels) and the `# TYPE` of each family."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                self.types[name] = kind
            elif line and not line.startswith("#"):
                match = _SAMPLE.match(line)
                assert match, line
                name, labels, value = match.groups()
                self.samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))

    def __call__(self, name: str, **labels: str) -> float:
        """The one sample of `xyserve:<name>` (of `name` for http_*, process_*) with these labels
        (fails unless exactly one)."""
        full = name if name.startswith(("http_", "process_")) else "xyserve:" + name
        found = [v for n, ls, v in self.samples
                 if n == full and labels.items() <= ls.items()]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    def buckets(self, name: str) -> list[float]:
        return [float(ls["le"]) for n, ls, _ in self.samples if n == f"xyserve:{name}_bucket"]


def post(http: TestClient, path: str, body: dict[str, object]) -> dict[str, object]:
    response = http.post(path, json={"model": NAME, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def streamed_usage(http: TestClient, path: str, body: dict[str, object]) -> dict[str, int]:
    body = {"model": NAME, "stream": True, "stream_options": {"include_usage": True}, **body}
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    usage: dict[str, int] = json.loads(lines[-1].removeprefix("data: "))["usage"]
    return usage


def test_metrics_count_exactly_what_was_served(make_core: MakeCore) -> None:
    app = build_app(AsyncEngine(make_core()), ServerConfig(served_model_name=NAME))
    with TestClient(app) as http:
        before = Scrape(http.get("/metrics").text)
        # 1. one prompt, n=2: two engine requests of 3 tokens each
        u1 = post(http, "/v1/completions", {"prompt": "Count me in", "n": 2, "max_tokens": 3,
                                            "ignore_eos": True})["usage"]
        # 2. a streamed chat: one request of 4 tokens
        u2 = streamed_usage(http, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi there"}],
                             "max_tokens": 4, "ignore_eos": True})
        # 3. two prompts: two requests of 5 tokens each
        u3 = post(http, "/v1/completions", {"prompt": ["First prompt", "A second, longer one"],
                                            "max_tokens": 5, "ignore_eos": True})["usage"]
        # 4. a request that stops at its first token
        r4 = post(http, "/v1/completions", {"prompt": "Stop", "max_tokens": 5,
                                            "logit_bias": {str(STOP_TOKEN): 100},
                                            "stop_token_ids": [STOP_TOKEN]})
        u4 = r4["usage"]
        after = Scrape(http.get("/metrics").text)

    assert [c["finish_reason"] for c in r4["choices"]] == ["stop"]  # type: ignore[index]
    num_requests = 2 + 1 + 2 + 1
    # OpenAI's usage counts a prompt once per call; the engine prefills it for each of n choices.
    prompt_tokens = 2 * u1["prompt_tokens"] + u2["prompt_tokens"] + u3["prompt_tokens"] \
        + u4["prompt_tokens"]
    generation_tokens = sum(u["completion_tokens"] for u in (u1, u2, u3, u4))
    assert generation_tokens == 2 * 3 + 4 + 2 * 5 + 1

    for name in ("prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count"):
        assert before(name) == 0, name
    assert after("prompt_tokens_total") == prompt_tokens
    assert after("generation_tokens_total") == generation_tokens
    assert after("request_success_total", finished_reason="length") == 5
    assert after("request_success_total", finished_reason="stop") == 1
    assert after("request_success_total", finished_reason="abort") == 0
    assert after("request_success_total", finished_reason="error") == 0
    assert after("num_preemptions_total") == 0
    # One TTFT, e2e and queue time per request; an inter-token latency per token after the
    # first; on both clocks.
    for prefix in ("", "npu_"):
        assert after(f"{prefix}time_to_first_token_seconds_count") == num_requests
        assert after(f"{prefix}e2e_request_latency_seconds_count") == num_requests
        assert after(f"{prefix}inter_token_latency_seconds_count") == \
            generation_tokens - num_requests
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                     "inter_token_latency_seconds"):
            assert after(f"{prefix}{name}_sum") > 0, prefix + name
    assert after("request_queue_time_seconds_count") == num_requests
    # vLLM's per-request series: one observation per finished request.
    for name in ("request_prompt_tokens", "request_generation_tokens", "request_params_n",
                 "request_params_max_tokens", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds"):
        assert after(f"{name}_count") == num_requests, name
    assert after("request_prompt_tokens_sum") == prompt_tokens
    assert after("request_generation_tokens_sum") == generation_tokens
    assert after("request_params_n_sum") == 2 * 2 + 1 + 1 + 1 + 1  # n=2 twice, then n=1
    assert after("request_params_max_tokens_sum") == 2 * 3 + 4 + 2 * 5 + 5
    assert after("request_inference_time_seconds_sum") >= after("request_decode_time_seconds_sum")
    assert after("prefix_cache_queries_total") >= prompt_tokens  # every admitted prompt
    assert 0 <= after("prefix_cache_hits_total") <= after("prefix_cache_queries_total")
    assert after("cache_config_info", block_size="16", num_gpu_blocks="64",
                 enable_prefix_caching="True") == 1
    # HTTP series by handler and status (the scrapes themselves are not counted).
    assert after("http_requests_total", handler="/v1/completions", method="POST",
                 status="200") == 3
    assert after("http_requests_total", handler="/v1/chat/completions", status="200") == 1
    # The two clocks are different clocks.
    assert after("npu_e2e_request_latency_seconds_sum") != after("e2e_request_latency_seconds_sum")
    # Steps: every scheduled token once; one step time, utilization per step that ran.
    num_steps = after("iteration_tokens_total_count")
    assert num_steps >= 1 + 4 + 5  # at least a prefill and the decodes of the longest request
    assert after("iteration_tokens_total_sum") == prompt_tokens + generation_tokens
    for name in ("npu_step_seconds", "npu_cube_utilization", "npu_vector_utilization"):
        assert after(f"{name}_count") == num_steps, name
    step_sim_s = after("npu_step_seconds_sum")
    kernel_sim_s = {p: after("npu_kernel_seconds_total", primitive=p)
                    for p in ("gemm", "vector", "attention")}
    assert all(s > 0 for s in kernel_sim_s.values()), kernel_sim_s
    assert sum(kernel_sim_s.values()) <= step_sim_s  # plus the modelled host overhead
    host_sim_s = after("npu_host_seconds_total")
    assert 0 < host_sim_s < step_sim_s  # the stack's per-step terms at least
    assert 0 < after("npu_cube_utilization_sum") <= num_steps
    assert 0 < after("npu_vector_utilization_sum") <= num_steps
    assert after("npu_hbm_bytes_total") > 0
    assert 0 <= after("npu_padding_waste_ratio") < 1
    # Idle again, nothing held.
    assert after("num_requests_running") == after("num_requests_waiting") == 0
    assert after("kv_cache_usage_perc") == 0


def test_families_types_labels_and_buckets(make_core: MakeCore) -> None:
    app = build_app(AsyncEngine(make_core()), ServerConfig(served_model_name=NAME))
    with TestClient(app) as http:
        post(http, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    scrape = Scrape(response.text)
    assert scrape.types == {**{"xyserve:" + name: kind for name, kind in FAMILIES.items()},
                            **HTTP_FAMILIES, **PROCESS_FAMILIES}
    assert all(labels.get("model_name") == NAME for name, labels, _ in scrape.samples
               if name.startswith("xyserve:"))
    assert not any(name.endswith("_created") for name, _, _ in scrape.samples)
    # process_* describe this process (the in-process server): real values
    assert scrape("process_resident_memory_bytes") > 10e6
    assert scrape("process_cpu_seconds_total") > 0
    assert scrape("process_open_fds") >= 3
    for name in LATENCY_HISTOGRAMS:
        assert scrape.buckets(name) == [*LATENCY_BUCKETS_S, math.inf], name
        assert scrape(f"{name}_bucket", le="+Inf") == scrape(f"{name}_count"), name
    assert scrape.buckets("iteration_tokens_total") == [*ITERATION_TOKENS_BUCKETS, math.inf]
    assert scrape.buckets("npu_cube_utilization") == [*UTILIZATION_BUCKETS, math.inf]
    # The buckets resolve both clocks: sub-millisecond NPU steps and minutes of wall time.
    assert LATENCY_BUCKETS_S[0] <= 1e-4 and LATENCY_BUCKETS_S[-1] >= 600


def test_resident_memory_is_this_process(make_core: MakeCore) -> None:
    """process_resident_memory_bytes is the serving process's resident set (here, this one)."""
    app = build_app(AsyncEngine(make_core()), ServerConfig(served_model_name=NAME))
    with TestClient(app) as http:
        scrape = Scrape(http.get("/metrics").text)
        resident = resident_bytes()
    [exported] = [v for n, _, v in scrape.samples if n == "process_resident_memory_bytes"]
    assert resident is not None and abs(exported - resident) < 0.1 * resident


def _request(e2e_s: float) -> RequestMetrics:
    return RequestMetrics(queue_s=0.01, ttft_s=0.1, e2e_s=e2e_s, ttft_sim_s=0.001,
                          e2e_sim_s=e2e_s / 100, num_prompt_tokens=7, num_output_tokens=3)


def _iteration(finished: tuple[FinishedRequestStats, ...] = (), trace: object = None,
               num_preempted: int = 0) -> IterationStats:
    return IterationStats(num_prompt_tokens=7, num_generation_tokens=2,
                          num_preempted_reqs=num_preempted, step_s=0.05, step_sim_s=0.002,
                          ttfts_s=(0.1,), ttfts_sim_s=(0.001,),
                          inter_token_latencies_s=(0.03,), inter_token_latencies_sim_s=(0.0005,),
                          finished=finished, trace=trace)


def test_stat_logger_records_iteration_stats() -> None:
    scheduler = SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.25,
                               num_preemptions=1, num_free_blocks=10)
    metrics = ServerMetrics("m", lambda: scheduler)
    trace = SimpleNamespace(sim_s=0.002, host_s=0.0005, cube_utilization=0.4,
                            vector_utilization=0.05,
                            hbm_bytes=1e6, padding_waste_ratio=0.125,
                            kernel_s_by_primitive={"gemm": 0.001, "attention": 0.0004,
                                                   "future": 0.0001})
    metrics.record(scheduler, _iteration(trace=trace, num_preempted=1))
    metrics.record(scheduler, _iteration(
        finished=(FinishedRequestStats("abort", _request(2.0)),
                  FinishedRequestStats("length", _request(4.0))),
        trace=None))  # a step that did not run on the NPU (failed, or only aborts)
    scrape = Scrape(metrics.render().decode())
    assert scrape("num_requests_running") == 3 and scrape("num_requests_waiting") == 2
    assert scrape("kv_cache_usage_perc") == 0.25
    assert scrape("prompt_tokens_total") == 14 and scrape("generation_tokens_total") == 4
    assert scrape("num_preemptions_total") == 1
    assert scrape("request_success_total", finished_reason="abort") == 1
    assert scrape("request_success_total", finished_reason="length") == 1
    assert scrape("request_success_total", finished_reason="stop") == 0
    assert scrape("e2e_request_latency_seconds_sum") == pytest.approx(6.0)
    assert scrape("npu_e2e_request_latency_seconds_sum") == pytest.approx(0.06)
    assert scrape("request_queue_time_seconds_count") == 2
    assert scrape("time_to_first_token_seconds_count") == 2
    assert scrape("npu_inter_token_latency_seconds_sum") == pytest.approx(0.001)
    # Per-step NPU series only for the step that ran on it.
    assert scrape("npu_step_seconds_count") == 1 and scrape("npu_step_seconds_sum") == 0.002
    assert scrape("npu_cube_utilization_sum") == pytest.approx(0.4)
    assert scrape("npu_cube_utilization_bucket", le="0.4") == 1
    assert scrape("npu_cube_utilization_bucket", le="0.3") == 0
    assert scrape("npu_hbm_bytes_total") == 1e6
    assert scrape("npu_host_seconds_total") == pytest.approx(0.0005)
    assert scrape("npu_padding_waste_ratio") == 0.125
    assert scrape("npu_kernel_seconds_total", primitive="gemm") == pytest.approx(0.001)
    assert scrape("npu_kernel_seconds_total", primitive="vector") == 0
    assert scrape("npu_kernel_seconds_total", primitive="future") == pytest.approx(0.0001)
    assert scrape("iteration_tokens_total_count") == 2  # both steps scheduled tokens
    # A simulated 500 us inter-token latency and a 30 ms wall one land in different buckets.
    assert scrape("npu_inter_token_latency_seconds_bucket", le="0.0005") == 2
    assert scrape("npu_inter_token_latency_seconds_bucket", le="0.0002") == 0
    assert scrape("inter_token_latency_seconds_bucket", le="0.02") == 0
    assert scrape("inter_token_latency_seconds_bucket", le="0.05") == 2
