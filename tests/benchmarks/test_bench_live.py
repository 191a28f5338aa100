"""`xyserve bench` against a running tiny-model xyserve: the numbers are plausible and agree with
each other and with the server's own usage and counters; the JSON result file is written."""

from __future__ import annotations

import json
import pathlib

import pytest

from server.cli import main
from tests.server.harness import ServerProcess

PERCENTILE_KEYS = ("p50", "p90", "p99")


def _bench(server: ServerProcess, tokenizer: pathlib.Path, out: pathlib.Path,
           *extra: str) -> dict:
    status = main(["bench", "--base-url", server.url, "--model", server.model,
                   "--tokenizer", str(tokenizer), "--result-file", str(out), "--save-detailed",
                   "--disable-tqdm", *extra])
    assert status == 0
    return json.loads(out.read_text())


def _check_consistent(result: dict, num_prompts: int) -> None:
    assert result["completed"] == num_prompts and result["failed"] == 0
    requests = result["requests"]
    assert len(requests) == num_prompts
    assert result["usage_reported"] and all(r["usage_reported"] for r in requests)
    # token totals are the sums of what the server reported per request
    assert result["total_input_tokens"] == sum(r["prompt_len"] for r in requests)
    assert result["total_output_tokens"] == sum(r["output_len"] for r in requests)
    duration = result["duration_s"]
    assert duration > 0
    assert result["request_throughput"] == pytest.approx(num_prompts / duration)
    assert result["output_throughput"] == pytest.approx(result["total_output_tokens"] / duration)
    assert result["total_token_throughput"] == pytest.approx(
        (result["total_input_tokens"] + result["total_output_tokens"]) / duration)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = result[key]
        values = [stats[p] for p in PERCENTILE_KEYS]
        assert values == sorted(values), (key, stats)
        assert stats["median"] == pytest.approx(stats["p50"])
        assert 0 <= stats["p50"] <= stats["p99"]
    assert 0 < result["ttft_ms"]["p50"] <= result["e2e_ms"]["p50"]
    assert max(r["e2e_s"] for r in requests) <= duration
    for r in requests:
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itls_s"]) <= r["output_len"] - 1  # one gap per chunk after the first
        # the request's time is its first chunk plus the gaps after it
        assert r["ttft_s"] + sum(r["itls_s"]) <= r["e2e_s"] + 1e-6


def test_random_workload_closed_loop(bench_server: ServerProcess, tiny_llama_dir: pathlib.Path,
                                     tmp_path: pathlib.Path) -> None:
    out = tmp_path / "result.json"
    result = _bench(bench_server, tiny_llama_dir, out, "--dataset", "random",
                    "--random-input-len", "24", "--random-output-len", "12",
                    "--random-range-ratio", "0.5", "--num-prompts", "12",
                    "--max-concurrency", "4", "--ignore-eos", "--slo", "ttft=60000,tpot=60000",
                    "--num-warmups", "1")
    _check_consistent(result, 12)
    assert result["max_concurrency"] == 4 and result["request_rate"] == "inf"
    # ignore_eos: every request generated exactly its max_tokens, drawn from 12 * [0.5, 1.5]
    outputs = [r["output_len"] for r in result["requests"]]
    assert all(6 <= n <= 18 for n in outputs)
    # lavish SLOs: every request is good, and goodput never exceeds throughput
    assert result["good_requests"] == 12
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    # the server counted the same tokens (its /metrics, read before and after)
    counters = result["server_metrics"]["counters"]
    assert counters["xyserve:generation_tokens_total"] == result["total_output_tokens"]
    # (prompt tokens the server computed: cached prefix tokens may be left out)
    assert 0 < counters["xyserve:prompt_tokens_total"] <= result["total_input_tokens"]
    npu = result["npu"]  # the simulated NPU's clock for the same run
    assert npu["num_steps"] > 0 and npu["busy_s"] > 0 and npu["mean_step_ms"] > 0


def test_poisson_arrivals_sharegpt_and_tight_slo(bench_server: ServerProcess,
                                                 tiny_llama_dir: pathlib.Path,
                                                 tmp_path: pathlib.Path) -> None:
    conversations = [{"conversations": [
        {"from": "human", "value": f"Tell me about topic number {i} in a few sentences please."},
        {"from": "gpt", "value": "Sure. " * (5 + i)}]} for i in range(8)]
    conversations.append({"conversations": [{"from": "human", "value": "unanswered"}]})
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    out = tmp_path / "result.json"
    result = _bench(bench_server, tiny_llama_dir, out, "--dataset", "sharegpt",
                    "--dataset-path", str(dataset), "--num-prompts", "6",
                    "--request-rate", "40", "--burstiness", "0.5", "--seed", "3",
                    "--slo", "ttft=0.001", "--ignore-eos")
    _check_consistent(result, 6)
    assert result["request_rate"] == 40 and result["burstiness"] == 0.5
    assert result["good_requests"] == 0 and result["request_goodput"] == 0.0  # 1 us TTFT: none
    starts = sorted(r["start_s"] for r in result["requests"])
    assert starts[-1] > starts[0]  # spread out by the arrival process, not all at once


def test_shared_prefix_workload_hits_the_prefix_cache(bench_server: ServerProcess,
                                                      tiny_llama_dir: pathlib.Path,
                                                      tmp_path: pathlib.Path) -> None:
    out = tmp_path / "result.json"
    result = _bench(bench_server, tiny_llama_dir, out, "--dataset", "shared-prefix",
                    "--prefix-len", "120", "--question-len", "8", "--output-len", "4",
                    "--num-prompts", "6", "--max-concurrency", "1", "--ignore-eos")
    _check_consistent(result, 6)
    assert all(r["prompt_len"] > 120 for r in result["requests"])
    hits = result["server_metrics"]["counters"].get("xyserve:prefix_cache_hits_total")
    if hits is not None:  # exported by the server's metrics (tokens served from the cache)
        assert hits >= 5 * 112  # the 16-token blocks of the prefix, for each later request


def test_unreachable_server_is_an_error_not_a_crash(tiny_llama_dir: pathlib.Path,
                                                    tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    status = main(["bench", "--base-url", "http://127.0.0.1:9", "--model", "x",
                   "--tokenizer", str(tiny_llama_dir), "--num-prompts", "2",
                   "--random-input-len", "4", "--random-output-len", "2", "--disable-tqdm",
                   "--result-file", str(out)])
    assert status == 1  # nothing completed
    result = json.loads(out.read_text())
    assert result["completed"] == 0 and result["failed"] == 2 and result["errors"]
    assert "Failed requests" in capsys.readouterr().out


def test_chat_endpoint_sends_sharegpt_conversations_multi_turn(bench_server: ServerProcess,
                                                               tiny_llama_dir: pathlib.Path,
                                                               tmp_path: pathlib.Path) -> None:
    history_words = 60  # the earlier turns: far longer than the last question
    conversations = [{"conversations": [
        {"from": "human", "value": "First question " + "about things " * history_words},
        {"from": "gpt", "value": "An answer " * history_words},
        {"from": "human", "value": f"And question {i}?"},
        {"from": "gpt", "value": "Sure. " * (5 + i)}]} for i in range(4)]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    out = tmp_path / "result.json"
    result = _bench(bench_server, tiny_llama_dir, out, "--endpoint", "/v1/chat/completions",
                    "--dataset", "sharegpt", "--dataset-path", str(dataset),
                    "--num-prompts", "4", "--ignore-eos")
    _check_consistent(result, 4)
    assert result["endpoint"] == "/v1/chat/completions"
    # The server's own prompt counts include the earlier turns (and the chat template).
    assert all(r["prompt_len"] > 2 * history_words for r in result["requests"])
