"""Workloads of the end-to-end experiments (benchmarks.e2e_calibration, benchmarks.e2e_ablation):
a ShareGPT-like mix drawn to given token totals, and the fixed-shape Sonnet-style mixes of vLLM's
benchmarks, as cluster.workload Workloads (synthetic prompts: no shared prefixes).

ShareGPT-like lengths [assumed]: the calibration rows CE1 / CE2 publish only totals (1000 prompts,
217,393 prompt and 201,469 output tokens). ShareGPT's lengths are heavy-tailed, prompts more so
than replies, so prompts are drawn log-normal with sigma 1.1 and outputs with sigma 0.9 (a
median of ~0.55x and ~0.67x the mean), then filtered as `vllm bench serve` samples ShareGPT
(prompt and output at least 4 tokens, prompt at most 1024, prompt + output at most 2048: its
`is_valid_sequence` defaults) by clipping rather than redrawing, and scaled so the totals are
exactly the published ones. The sigmas are not published anywhere this project may fit to;
the calibration reports how much the fitted constants move with them.
"""

from __future__ import annotations

import math
import random

import numpy as np

from cluster.workload import RequestSpec, Workload, arrival_times

CE_NUM_PROMPTS = 1000  # [CE1, CE2] ShareGPT prompts sent at once
CE_PROMPT_TOKENS = 217_393  # [CE1, CE2] their prompt tokens
CE_OUTPUT_TOKENS = 201_469  # [CE1, CE2] tokens generated
PROMPT_SIGMA = 1.1  # [assumed] log-space spread of ShareGPT prompt lengths
OUTPUT_SIGMA = 0.9  # [assumed] ... and of reply lengths
MIN_LEN, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048  # vllm bench serve's ShareGPT filter


def _lengths_to_total(z: np.ndarray, sigma: float, total: int, low: int,
                      high: np.ndarray) -> np.ndarray:
    """Integer lengths exp(mu + sigma z) clipped to [low, high], with mu chosen (bisection) so
    they sum to `total`, the rounding remainder spread one token at a time."""
    lo_mu, hi_mu = -10.0, 20.0
    for _ in range(100):
        mu = (lo_mu + hi_mu) / 2
        if np.clip(np.exp(mu + sigma * z), low, high).sum() < total:
            lo_mu = mu
        else:
            hi_mu = mu
    lengths = np.clip(np.round(np.exp(mu + sigma * z)), low, high).astype(np.int64)
    order = np.argsort(-z)  # the remainder goes to (comes from) the longest first
    i = 0
    while (diff := total - int(lengths.sum())) != 0:
        j = order[i % len(order)]
        step = 1 if diff > 0 else -1
        if low <= lengths[j] + step <= high[j]:
            lengths[j] += step
        i += 1
    return lengths


def sharegpt_like(num_requests: int = CE_NUM_PROMPTS, rate: float = math.inf, seed: int = 0,
                  prompt_tokens: int = CE_PROMPT_TOKENS, output_tokens: int = CE_OUTPUT_TOKENS,
                  prompt_sigma: float = PROMPT_SIGMA,
                  output_sigma: float = OUTPUT_SIGMA) -> Workload:
    """`num_requests` ShareGPT-like requests whose prompt and output lengths sum to exactly the
    given totals (scaled to `num_requests` from CE's 1000), arriving at `rate` (Poisson; inf:
    all at time 0, as `vllm bench serve` without --request-rate)."""
    rng = np.random.default_rng(seed)
    z_in, z_out = rng.standard_normal(num_requests), rng.standard_normal(num_requests)
    scale = num_requests / CE_NUM_PROMPTS
    prompts = _lengths_to_total(z_in, prompt_sigma, round(prompt_tokens * scale), MIN_LEN,
                                np.full(num_requests, MAX_PROMPT))
    outputs = _lengths_to_total(z_out, output_sigma, round(output_tokens * scale), MIN_LEN,
                                MAX_TOTAL - prompts)
    times = arrival_times(num_requests, rate, "poisson", 1.0, random.Random(seed))
    requests = tuple(RequestSpec(t, int(p), int(o))
                     for t, p, o in zip(times, prompts, outputs, strict=True))
    return Workload(requests, f"ShareGPT-like x{num_requests} (lognormal sigma {prompt_sigma:g}"
                              f" / {output_sigma:g}, {int(prompts.sum())} in / "
                              f"{int(outputs.sum())} out tokens) at {rate:g} req/s, seed {seed}")


def fixed(num_requests: int, rate: float, prompt_len: int, output_len: int, name: str,
          seed: int = 0) -> Workload:
    """`num_requests` requests of one shape (vLLM's Sonnet benchmarks: every prompt the same
    length), Poisson arrivals at `rate`."""
    times = arrival_times(num_requests, rate, "poisson", 1.0, random.Random(seed))
    return Workload(tuple(RequestSpec(t, prompt_len, output_len) for t in times),
                    f"{name} ({prompt_len} in / {output_len} out) x{num_requests} at {rate:g} "
                    f"req/s, seed {seed}")
