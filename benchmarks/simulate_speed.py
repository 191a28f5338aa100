"""How fast `xyserve simulate` replays a trace: steps, requests and simulated seconds per wall
second, and peak memory, on the issue's reference run (the whole Azure 2023 conversation trace,
Llama-2-7B on one 910B2, 2048-token budget, 256 sequences, max_model_len 16384).

    .venv/bin/python -m benchmarks.simulate_speed                      # the reference run
    .venv/bin/python -m benchmarks.simulate_speed --num-requests 2000  # a shorter one

The first run of a process pays the GEMM tiling searches (once per token count and GEMM shape);
`--repeats 2` runs again in the same process with those cached, the steady-state speed. As in
`xyserve simulate`, a forked worker builds the steps' head templates on a second core where one
is free (engine.head_prefetch; `--no-prefetch`: none). Writes
benchmarks/results/<date>-simulate-speed.md (+ .json) unless --no-save.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any

from benchmarks import RESULTS_DIR
from cluster.cluster_sim import ClusterSimulation
from cluster.workload import read_azure_csv, shape

DEFAULT_TRACE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "AzureLLMInferenceTrace_conv.csv"


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    workload = shape(read_azure_csv(args.trace), num_requests=args.num_requests,
                     max_model_len=args.max_model_len)
    start = time.perf_counter()
    sim = ClusterSimulation(args.model, npu=args.npu,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            prefetch_heads=False if args.no_prefetch else None)
    result = sim.run(workload)
    total_s = time.perf_counter() - start
    s = result.summary
    return {"num_requests": s.num_requests, "num_steps": s.num_steps, "loop_wall_s": s.wall_s,
            "total_wall_s": total_s, "steps_per_s": s.steps_per_s,
            "requests_per_s": s.requests_per_s, "sim_to_wall": s.sim_to_wall,
            "duration_sim_s": s.duration_s, "ttft_p50_s": s.ttft_s["p50"],
            "tpot_p50_s": s.tpot_s["p50"], "output_throughput": s.output_throughput,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=pathlib.Path, default=DEFAULT_TRACE)
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--npu", default="910b2")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs in this process; the first pays the tiling searches")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="no head-template worker on a second core (xyserve simulate has "
                             "one where a second core is free)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    runs = []
    for i in range(args.repeats):
        run = run_once(args)
        runs.append(run)
        print(f"run {i + 1}: {run['num_requests']} requests, {run['num_steps']} steps in "
              f"{run['loop_wall_s']:.1f} s loop / {run['total_wall_s']:.1f} s total: "
              f"{run['steps_per_s']:.0f} steps/s, {run['requests_per_s']:.0f} req/s, "
              f"{run['sim_to_wall']:.1f}x real time, peak RSS {run['max_rss_mib']:.0f} MiB",
              flush=True)
    if args.no_save:
        return 0
    date = time.strftime("%Y-%m-%d")
    command = " ".join(["python -m benchmarks.simulate_speed", *sys.argv[1:]])
    machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{date}-simulate-speed.json").write_text(json.dumps(
        {"date": date, "command": command, "machine": machine, "runs": runs}, indent=2))
    lines = [f"# xyserve simulate: speed ({date})", "", f"Command: `{command}`  ",
             f"Machine: {machine}",
             "", "| run | requests | steps | loop wall s | total wall s | steps/s | req/s | "
             "sim/wall | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['num_requests']} | {r['num_steps']} | {r['loop_wall_s']:.1f} | "
                     f"{r['total_wall_s']:.1f} | {r['steps_per_s']:.0f} | "
                     f"{r['requests_per_s']:.0f} | {r['sim_to_wall']:.1f} | "
                     f"{r['max_rss_mib']:.0f} |")
    (RESULTS_DIR / f"{date}-simulate-speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
