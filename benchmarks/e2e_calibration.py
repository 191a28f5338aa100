"""The end-to-end calibration rows CE1 (vllm-ascend) and CE2 (MindIE) of
research/npu-calibration.md through `xyserve simulate`, and the fit of their stack profiles.

    python -m benchmarks.e2e_calibration          # the rows with npu_sim.host's constants
    python -m benchmarks.e2e_calibration --fit    # refit per_request_s of both stacks

Both rows: Qwen3-8B (bf16) on one 910B, `vllm bench serve` sending 1000 ShareGPT prompts at once
(217,393 in / 201,469 out tokens; lengths drawn as benchmarks.e2e_workloads.sharegpt_like says).
What is fitted: each stack's `per_request_s` (npu_sim.host), on the row's output throughput,
by the secant method, every other term of the profile held at its documented value. What then
comes out, as checks: CE1's mean TPOT and mean TTFT, CE2's median ITL.

Engine settings are each stack's defaults as far as they are documented [assumed where not]:
- vllm-ascend v0.9.1 (vLLM V1 engine): chunked prefill in a 2048-token budget, 256 sequences,
  128-token blocks, 90% of HBM for weights + KV (`gpu_memory_utilization` 0.9).
- MindIE 2.1.RC1: prefill-first batches (no SplitFuse unless configured): prefill batches of up
  to 8192 tokens (`maxPrefillTokens`), 200 sequences (`maxBatchSize`), 128-token blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from benchmarks.e2e_workloads import OUTPUT_SIGMA, PROMPT_SIGMA, sharegpt_like
from cluster.results import Summary
from cluster.simulation import Simulation
from npu_sim import host

MODEL = "qwen3-8b"
NPU = "910b2"  # "one 910B": the 64 GB B2, as the kernel rows


@dataclass(frozen=True)
class CeRow:
    """One end-to-end calibration row and how it is simulated."""

    row_id: str
    stack: str  # npu_sim.host profile
    engine: dict[str, Any]  # EngineConfig options (the stack's serving defaults)
    output_tok_per_s: float  # published: the fitted metric
    checks: dict[str, float]  # published metrics the fit must not touch: name -> value


CE_ROWS = (
    CeRow("CE1", "vllm-ascend", {"policy": "token_budget", "max_num_batched_tokens": 2048,
                                 "max_num_seqs": 256, "block_size": 128}, 1512.0,
          {"mean TPOT (s)": 0.125, "mean TTFT (s)": 44.0}),
    CeRow("CE2", "mindie", {"policy": "prefill_first", "max_num_batched_tokens": 8192,
                            "max_num_seqs": 200, "block_size": 128}, 2711.0,
          {"median ITL (s)": 0.0454}),
)


def check_value(summary: Summary, name: str) -> float:
    """The simulated value of a published check metric."""
    return {"mean TPOT (s)": summary.tpot_s["mean"], "mean TTFT (s)": summary.ttft_s["mean"],
            "median ITL (s)": summary.itl_s["p50"]}[name]


@contextlib.contextmanager
def stack_override(profile: host.HostProfile) -> Iterator[None]:
    """Run with `profile` in place of its namesake in npu_sim.host.STACKS (fitting only)."""
    saved = host.STACKS[profile.name]
    host.STACKS[profile.name] = profile
    try:
        yield
    finally:
        host.STACKS[profile.name] = saved


def simulate(row: CeRow, profile: host.HostProfile | None = None, seed: int = 0,
             **workload_options: Any) -> Summary:
    """The row's run through `xyserve simulate` (with `profile` for its stack, if given)."""
    with stack_override(profile or host.STACKS[row.stack]):
        sim = Simulation(MODEL, npu=NPU, npu_dtype="bf16", npu_stack=row.stack, **row.engine)
        return sim.run(sharegpt_like(seed=seed, **workload_options)).summary


def fit_per_request(row: CeRow, tolerance: float = 0.002, **workload_options: Any
                    ) -> tuple[float, Summary]:
    """per_request_s of the row's stack that makes the output throughput the published one
    (secant on the throughput's relative error); returns it and the run at it."""
    base = host.STACKS[row.stack]
    tried: list[tuple[float, float, Summary]] = []
    x = base.per_request_s
    for _ in range(8):
        s = simulate(row, dataclasses.replace(base, per_request_s=x), **workload_options)
        err = s.output_throughput / row.output_tok_per_s - 1
        tried.append((x, err, s))
        print(f"  {row.row_id} per_request_s {x * 1e3:.4f} ms -> {s.output_throughput:.1f} "
              f"tok/s ({err:+.2%})", flush=True)
        if abs(err) <= tolerance:
            break
        if len(tried) == 1:
            x *= 1 + err * 2  # throughput falls with per-request time: a first nudge
        else:
            (x0, e0, _), (x1, e1, _) = tried[-2], tried[-1]
            x = max(x1 - e1 * (x1 - x0) / (e1 - e0), 0.0)
    x, _, s = min(tried, key=lambda t: abs(t[1]))
    return x, s


def describe(row: CeRow, s: Summary) -> str:
    lines = [f"{row.row_id} ({row.stack}): {s.output_throughput:.1f} output tok/s "
             f"(published {row.output_tok_per_s:g}, "
             f"{s.output_throughput / row.output_tok_per_s - 1:+.1%}), "
             f"host overhead {s.host_overhead_share:.1%} of step time"]
    for name, published in row.checks.items():
        value = check_value(s, name)
        lines.append(f"  check {name}: {value:.4g} (published {published:g}, "
                     f"{value / published - 1:+.1%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e_calibration",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit each stack's per_request_s")
    parser.add_argument("--rows", default="CE1,CE2", help="which rows (default: %(default)s)")
    parser.add_argument("--sensitivity", action="store_true",
                        help="also refit with the length spreads at 0.8x and 1.2x")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for row in (r for r in CE_ROWS if r.row_id in args.rows.split(",")):
        if args.fit:
            x, s = fit_per_request(row)
            print(f"{row.row_id}: fitted {row.stack} per_request_s = {x * 1e3:.4f} ms")
            if args.sensitivity:
                for f in (0.8, 1.2):
                    xs, ss = fit_per_request(row, prompt_sigma=PROMPT_SIGMA * f,
                                             output_sigma=OUTPUT_SIGMA * f)
                    print(f"  sigmas x{f}: per_request_s = {xs * 1e3:.4f} ms "
                          f"({xs / x - 1:+.1%})\n  " + describe(row, ss).replace("\n", "\n  "))
        else:
            s = simulate(row)
        print(describe(row, s), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
