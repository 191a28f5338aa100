"""Run one benchmark from parsed `xyserve bench` options: build, send, measure, report."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.request
from dataclasses import asdict
from typing import Any

from benchmarks.load.datasets import (
    BenchRequest,
    load_tokenizer,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
)
from benchmarks.load.metrics import (
    client_metrics,
    npu_summary,
    parse_slo,
    server_metrics_delta,
)


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.dataset == "random":
        return random_requests(tokenizer, args.num_prompts, args.random_input_len,
                               args.random_output_len, args.random_range_ratio, args.seed)
    if args.dataset == "shared-prefix":
        return shared_prefix_requests(tokenizer, args.num_prompts, args.prefix_len,
                                      args.question_len, args.output_len, args.num_prefixes,
                                      args.seed)
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path")
    return sharegpt_requests(tokenizer, args.dataset_path, args.num_prompts,
                             args.sharegpt_output_len, args.seed,
                             multi_turn=args.endpoint == "/v1/chat/completions")


def _get_metrics(base_url: str, api_key: str | None) -> str | None:
    """The server's /metrics text, or None where it has none (a peer) or cannot be reached."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{base_url}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10.0) as response:
            return response.read().decode("utf-8", errors="replace")
    except (OSError, ValueError):  # (urllib's HTTPError and URLError are OSErrors)
        return None


def benchmark(args: argparse.Namespace, requests: list[BenchRequest] | None = None,
              ) -> dict[str, Any]:
    """Run the benchmark `args` describe; returns the result (what --result-file holds)."""
    from tqdm.auto import tqdm

    from benchmarks.load.client import ClientConfig, run, run_requests

    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    slo = parse_slo(args.slo)
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    requests = requests if requests is not None else build_requests(args)
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    config = ClientConfig(base_url=base_url, model=args.model, endpoint=args.endpoint,
                          api_key=args.api_key,
                          temperature=args.temperature, ignore_eos=args.ignore_eos,
                          extra_body=extra_body, timeout_s=args.timeout)
    if args.num_warmups:
        warm = [BenchRequest(r.prompt, r.prompt_len, min(r.output_len, 16), r.history)
                for r in requests[:args.num_warmups]]
        warm_results, _ = run(run_requests(config, warm, math.inf, 1.0,
                                           args.max_concurrency, args.seed))
        failed = [r.error for r in warm_results if not r.success]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
    before = None if args.no_server_metrics else _get_metrics(base_url, args.api_key)
    with tqdm(total=len(requests), disable=args.disable_tqdm, desc="bench") as bar:
        results, duration_s = run(run_requests(
            config, requests, args.request_rate, args.burstiness, args.max_concurrency,
            args.seed, on_done=lambda _: bar.update(1)))
    after = None if before is None else _get_metrics(base_url, args.api_key)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base_url": base_url, "endpoint": args.endpoint, "model": args.model,
        "dataset": args.dataset,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos, "temperature": args.temperature,
        **client_metrics(results, duration_s, percentiles, slo),
    }
    errors = sorted({r.error for r in results if not r.success})
    if errors:
        result["errors"] = errors[:10]
    result["usage_reported"] = all(r.usage_reported for r in results if r.success)
    if before is not None and after is not None:
        server = server_metrics_delta(before, after)
        result["server_metrics"] = server
        npu = npu_summary(server)
        if npu:
            result["npu"] = npu
    if args.save_detailed:
        result["requests"] = [{k: v for k, v in asdict(r).items() if k != "text"}
                              for r in results]
    return result


def print_report(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    w = 50

    def line(label: str, value: Any, fmt: str = "{:.2f}") -> None:
        print(f"{label:<{w - 12}}{fmt.format(value):>12}", file=out)

    print("{:=^{w}}".format(" Serving Benchmark Result ", w=w), file=out)
    line("Successful requests:", result["completed"], "{}")
    line("Failed requests:", result["failed"], "{}")
    line("Benchmark duration (s):", result["duration_s"])
    line("Total input tokens:", result["total_input_tokens"], "{}")
    line("Total generated tokens:", result["total_output_tokens"], "{}")
    line("Request throughput (req/s):", result["request_throughput"])
    if "request_goodput" in result:
        line("Request goodput (req/s):", result["request_goodput"])
    line("Output token throughput (tok/s):", result["output_throughput"])
    line("Total token throughput (tok/s):", result["total_token_throughput"])
    for key, title in (("ttft_ms", "Time to First Token"),
                       ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        print("{:-^{w}}".format(title, w=w), file=out)
        name = key.split("_")[0].upper()
        for stat, value in result[key].items():
            if stat not in ("std", "p50"):  # p50 is the median
                label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
                line(f"{label} {name} (ms):", value)
    npu = result.get("npu")
    if npu:
        print("{:-^{w}}".format("Simulated NPU (server /metrics)", w=w), file=out)
        for key, label in (("mean_ttft_ms", "Mean NPU TTFT (ms):"),
                           ("mean_itl_ms", "Mean NPU ITL (ms):"),
                           ("mean_step_ms", "Mean NPU step (ms):"),
                           ("output_throughput", "NPU output throughput (tok/s):")):
            if key in npu:
                line(label, npu[key])
    for error in result.get("errors", []):
        print(f"error: {error}", file=out)
    print("=" * w, file=out)


def main(args: argparse.Namespace) -> int:
    try:
        result = benchmark(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"xyserve bench: error: {exc}", file=sys.stderr)
        return 2
    print_report(result)
    if args.result_file:
        with open(args.result_file, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"result written to {args.result_file}")
    return 0 if result["completed"] else 1
