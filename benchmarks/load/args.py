"""The options of `xyserve bench` (no heavy imports: the CLI builds its parser from these)."""

from __future__ import annotations

import argparse

from benchmarks.load.datasets import DATASETS, ENDPOINTS

# `xyserve serve`'s own address by default (a test keeps it equal to ServerConfig's); the bench
# knows the server only over HTTP.
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="server root, without /v1 (default: %(default)s)")
    p.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0],
                   help="the API to load: completions send a prompt; chat sends messages "
                        "(ShareGPT: each conversation's earlier turns too) (default: "
                        "%(default)s)")
    p.add_argument("--model", required=True, help="model name sent in every request")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to build prompts of given token lengths: a local directory, "
                        "an xyserve preset or a Hub name (default: --model)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer <key>`")
    d = p.add_argument_group("workload")
    d.add_argument("--dataset", choices=DATASETS, default="random",
                   help="(default: %(default)s)")
    d.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (--dataset sharegpt)")
    d.add_argument("--num-prompts", type=int, default=100, help="(default: %(default)s)")
    d.add_argument("--random-input-len", type=int, default=1024, help="(default: %(default)s)")
    d.add_argument("--random-output-len", type=int, default=128, help="(default: %(default)s)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from len * [1 - r, 1 + r] (default: "
                        "%(default)s)")
    d.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="output tokens of every ShareGPT request (default: its reply's length)")
    d.add_argument("--prefix-len", type=int, default=600,
                   help="shared-prefix: tokens of the common system prompt (default: %(default)s)")
    d.add_argument("--question-len", type=int, default=20,
                   help="shared-prefix: tokens of each question (default: %(default)s)")
    d.add_argument("--output-len", type=int, default=64,
                   help="shared-prefix: output tokens per request (default: %(default)s)")
    d.add_argument("--num-prefixes", type=int, default=1,
                   help="shared-prefix: distinct system prompts, used in turn (default: "
                        "%(default)s)")
    d.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    s = p.add_argument_group("sending")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default: inf, all at once)")
    s.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 = Poisson, <1 burstier "
                        "(default: %(default)s)")
    s.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at most (default: no limit)")
    s.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate past EOS (vLLM / xyserve extension)")
    s.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    s.add_argument("--extra-body", default=None,
                   help="JSON object merged into every request body (server-specific fields)")
    s.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent (and not measured) before the run (default: %(default)s)")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one request may take (default: %(default)s)")
    r = p.add_argument_group("report")
    r.add_argument("--metric-percentiles", default="50,90,99",
                   help="comma-separated percentiles to report (default: %(default)s)")
    r.add_argument("--slo", default=None,
                   help="service-level objectives in ms for goodput, e.g. ttft=500,tpot=50 "
                        "(keys: ttft, tpot, e2e)")
    r.add_argument("--result-file", default=None, help="write the full result as JSON here")
    r.add_argument("--save-detailed", action="store_true",
                   help="include every request's timings in the result file")
    r.add_argument("--no-server-metrics", action="store_true",
                   help="do not read the server's /metrics before and after")
    r.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
