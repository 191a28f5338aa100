"""The bench tool's pieces without a server: SLO parsing, percentiles, goodput, Prometheus
deltas, the arrival process and the datasets."""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import pytest

from benchmarks.load import client
from benchmarks.load.client import RequestResult
from benchmarks.load.datasets import random_requests, shared_prefix_requests, sharegpt_requests
from benchmarks.load.metrics import (
    Histogram,
    client_metrics,
    npu_summary,
    parse_slo,
    server_metrics_delta,
    summarize,
)


def test_parse_slo() -> None:
    assert parse_slo("ttft=500, tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo(None) == {}
    for bad in ("ttft", "latency=3", "tpot=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_summarize_in_milliseconds() -> None:
    s = summarize([0.001 * i for i in range(1, 101)], (50, 90, 99))
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert summarize([], (99,)) == {"mean": 0.0, "std": 0.0, "median": 0.0, "p99": 0.0}


def _result(ttft: float, e2e: float, out: int, ok: bool = True) -> RequestResult:
    return RequestResult(prompt_len=10, output_len=out, success=ok, ttft_s=ttft, e2e_s=e2e,
                         itls_s=[(e2e - ttft) / max(out - 1, 1)] * (out - 1))


def test_goodput_counts_requests_meeting_every_slo() -> None:
    results = [_result(0.1, 1.0, 10), _result(0.3, 1.0, 10), _result(0.1, 5.0, 10),
               _result(0.1, 1.0, 10, ok=False)]
    m = client_metrics(results, 2.0, (50, 99), {"ttft": 200, "tpot": 200})
    # tpot: 0.1 s, 0.078 s, 0.544 s; ttft 0.1, 0.3, 0.1: only the first meets both
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["good_requests"] == 1 and m["request_goodput"] == 0.5
    assert m["request_goodput"] <= m["request_throughput"] == 1.5
    assert m["total_output_tokens"] == 30 and m["output_throughput"] == 15.0


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    h = Histogram(sum=0.0, count=10, buckets={0.1: 2, 0.2: 8, 0.5: 10, math.inf: 10})
    assert h.quantile(0.5) == pytest.approx(0.15)  # rank 5 of 10: half-way through (0.1, 0.2]
    assert h.quantile(1.0) == pytest.approx(0.5)


METRICS_BEFORE = """\
# TYPE xyserve:npu_step_seconds histogram
xyserve:npu_step_seconds_bucket{le="0.005",model_name="m"} 10.0
xyserve:npu_step_seconds_bucket{le="+Inf",model_name="m"} 10.0
xyserve:npu_step_seconds_sum{model_name="m"} 0.02
xyserve:npu_step_seconds_count{model_name="m"} 10.0
# TYPE xyserve:generation_tokens_total counter
xyserve:generation_tokens_total{model_name="m"} 100.0
"""
METRICS_AFTER = METRICS_BEFORE.replace("10.0", "30.0").replace("0.02", "0.08").replace(
    "100.0", "400.0") + """\
# TYPE xyserve:npu_time_to_first_token_seconds histogram
xyserve:npu_time_to_first_token_seconds_bucket{le="0.01",model_name="m"} 4.0
xyserve:npu_time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0
xyserve:npu_time_to_first_token_seconds_sum{model_name="m"} 0.02
xyserve:npu_time_to_first_token_seconds_count{model_name="m"} 4.0
"""


def test_server_metrics_delta_and_npu_summary() -> None:
    delta = server_metrics_delta(METRICS_BEFORE, METRICS_AFTER)
    step = delta["histograms"]["xyserve:npu_step_seconds"]
    assert step["count"] == 20 and step["sum"] == pytest.approx(0.06)
    assert step["mean"] == pytest.approx(0.003)
    assert delta["counters"]["xyserve:generation_tokens_total"] == 300
    npu = npu_summary(delta)
    assert npu["mean_step_ms"] == pytest.approx(3.0) and npu["mean_ttft_ms"] == pytest.approx(5.0)
    assert npu["output_throughput"] == pytest.approx(300 / 0.06)
    assert npu_summary({"histograms": {}, "counters": {}}) == {}  # not an xyserve server


def test_arrivals_follow_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    gaps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        gaps.append(seconds)

    monkeypatch.setattr(client.asyncio, "sleep", fake_sleep)

    async def collect(rate: float, burstiness: float) -> list[int]:
        return [i async for i in client.arrivals(2000, rate, burstiness, seed=1)]

    assert asyncio.run(collect(20.0, 1.0)) == list(range(2000))
    assert len(gaps) == 1999 and sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    poisson_spread = max(gaps) / (sum(gaps) / len(gaps))
    gaps.clear()
    asyncio.run(collect(20.0, 8.0))  # more regular: same mean, less spread
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert max(gaps) / (sum(gaps) / len(gaps)) < poisson_spread
    gaps.clear()
    asyncio.run(collect(math.inf, 1.0))
    assert gaps == []  # all at once


def _read(reads: list[bytes], chat: bool = False) -> tuple[RequestResult, list[str]]:
    """The events of a response body arriving as `reads`, fed as the transport feeds them."""
    result = RequestResult(prompt_len=3)
    reader = client.EventReader(chat, 0.0, result)
    for data in reads:
        if reader.feed(data):
            break
    return result, reader.pieces


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_events_cut_anywhere_across_reads_are_read_whole() -> None:
    """Whatever bytes each read brings (an event split mid-JSON, several in one read, a field
    other than data), the chunks' texts, usage and [DONE] come out as sent."""
    stream = b"".join([
        b": a comment line\n\n",
        _sse({"choices": [{"index": 0, "text": "Hello"}]}),
        _sse({"choices": [{"index": 0, "text": ", w\u00f6rld\\n"}]}),
        b"event: message\n" + _sse({"choices": [{"index": 0, "text": "!"}]}),
        _sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
        b"data: [DONE]\n\n",
        _sse({"choices": [{"index": 0, "text": "after DONE: never read"}]}),
    ])
    for cuts in ([], [5, 40, 41, 90], list(range(1, len(stream)))):
        bounds = [0, *cuts, len(stream)]
        result, pieces = _read([stream[a:b] for a, b in itertools.pairwise(bounds)])
        assert pieces == ["Hello", ", w\u00f6rld\\n", "!"]
        assert (result.prompt_len, result.output_len, result.usage_reported) == (7, 3, True)
        assert len(result.itls_s) == 2 and not result.error


def test_an_error_event_ends_the_read_with_its_message() -> None:
    result, pieces = _read([
        _sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
        _sse({"error": {"message": "the engine died", "code": 500}})[:20],
        _sse({"error": {"message": "the engine died", "code": 500}})[20:],
    ], chat=True)
    assert pieces == ["Hi"] and "the engine died" in result.error


def test_datasets_lengths_and_shared_prefix(smollm2_tokenizer) -> None:
    reqs = random_requests(smollm2_tokenizer, 20, 40, 8, range_ratio=0.25, seed=5)
    assert reqs == random_requests(smollm2_tokenizer, 20, 40, 8, range_ratio=0.25, seed=5)
    assert all(r.prompt_len <= 50 and 6 <= r.output_len <= 10 for r in reqs)
    assert sum(r.prompt_len for r in reqs) > 20 * 30  # close to the asked lengths
    shared = shared_prefix_requests(smollm2_tokenizer, 6, 100, 10, 4, num_prefixes=2, seed=0)
    ids = [smollm2_tokenizer.encode(r.prompt, add_special_tokens=False) for r in shared]
    common = 0
    while all(len(x) > common and x[common] == ids[0][common] for x in ids[::2]):
        common += 1
    assert common >= 95  # prompts of one group share about the whole prefix, token for token
    assert ids[0][:20] != ids[1][:20]  # the two groups have different prefixes


def test_sharegpt_turns_single_and_multi_turn(tmp_path, smollm2_tokenizer) -> None:
    conversation = [{"from": "gpt", "value": "a greeting nobody asked for"},
                    {"from": "human", "value": "one two three four five"},
                    {"from": "gpt", "value": "six seven eight nine ten"},
                    {"from": "system", "value": "ignored"},
                    {"from": "human", "value": "eleven twelve thirteen fourteen"},
                    {"from": "gpt", "value": "fifteen sixteen seventeen eighteen nineteen"},
                    {"from": "human", "value": "unanswered at the end"}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": conversation}]))
    [first] = sharegpt_requests(smollm2_tokenizer, str(path), 1)
    assert first.prompt == "one two three four five" and first.history == ()
    assert first.messages == [{"role": "user", "content": "one two three four five"}]
    [last] = sharegpt_requests(smollm2_tokenizer, str(path), 1, multi_turn=True)
    assert last.prompt == "eleven twelve thirteen fourteen"
    assert last.messages == [
        {"role": "user", "content": "one two three four five"},
        {"role": "assistant", "content": "six seven eight nine ten"},
        {"role": "user", "content": "eleven twelve thirteen fourteen"}]
    assert last.prompt_len > first.prompt_len  # the history counts
    assert last.output_len == len(smollm2_tokenizer.encode(
        "fifteen sixteen seventeen eighteen nineteen", add_special_tokens=False))

