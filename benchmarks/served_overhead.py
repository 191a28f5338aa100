"""What serving costs: the same engine's output tokens/s served over HTTP against in process.

The served side is `xyserve serve` (default options) under benchmarks.compare_peers' decode-heavy
workload: 32 requests of 15 random tokens -> 128 tokens (ignore_eos), 16 streams in a closed
loop, through the load client. The in-process side is `LLM.generate` on the same shapes with the
same engine options (16 running at once, the rest joining as others finish, as the closed loop
sends them) and the server's OpenMP settings, in a fresh process
(benchmarks.offline_throughput). The two alternate, round after round, the server staying up and
idle meanwhile, so a machine that speeds up or slows down weighs on both; each round keeps the
best of --runs runs of each side. Prints each round, with the CPU each streamed token of the
served runs cost the load client, the HTTP front end and the engine process (on a small machine
the first two take cores the engine's kernels run on; counted over whole runs, so with each
run's warm-up, /metrics scrapes and prompt building: an upper bound of the streaming's own), then
the median ratio served / in process.

    .venv/bin/python -m benchmarks.served_overhead --rounds 4
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.compare_peers import WORKLOADS, Workload, build, run_workload
from benchmarks.load.datasets import load_tokenizer
from benchmarks.machine import cpu_seconds, with_descendants
from benchmarks.peers import Server, xyserve_spec
from engine.config import SchedulerConfig

MODEL = "smollm2-135m-instruct"
# what `xyserve serve` sets before torch loads (server/cli.py main)
SERVER_OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}


def in_process_tok_s(dtype: str, num_prompts: int, input_len: int, output_len: int,
                     concurrency: int, runs: int) -> float:
    """The best of `runs` LLM.generate runs, in a fresh process with the server's settings."""
    command = [sys.executable, "-m", "benchmarks.offline_throughput", "--model", MODEL,
               "--dtype", dtype, "--num-prompts", str(num_prompts), "--input-len",
               str(input_len), "--max-tokens", str(output_len), "--max-num-seqs",
               str(concurrency), "--max-num-batched-tokens",
               str(SchedulerConfig().max_num_batched_tokens),  # the server's default
               "--repeats", str(runs)]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, **SERVER_OMP_ENV}).stdout
    match = re.search(r"([\d.]+) generated tok/s", out)
    if match is None:
        raise SystemExit(f"no throughput in the offline benchmark's output:\n{out}")
    return float(match.group(1))


def served_tok_s(server: Server, workload: Workload, tokenizer: Any, seed: int) -> float:
    """One run of the workload against the server (new prompts for each seed)."""
    out = run_workload(server, lambda attempt: build(workload, tokenizer, seed + attempt),
                       workload.concurrency, 1.0, 0)
    return float(out["output_throughput"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="runs per side per round (best kept)")
    args = parser.parse_args()

    workload = next(w for w in WORKLOADS if w.name == "decode-heavy")
    tokenizer = load_tokenizer(MODEL)
    ratios = []
    with tempfile.TemporaryDirectory() as logs, \
            xyserve_spec(MODEL, args.dtype).start(pathlib.Path(logs)) as server:
        front_end = [server.process.pid]
        engine = [pid for pid in with_descendants(front_end) if pid not in front_end]
        for round_no in range(args.rounds):
            before = (time.process_time(), cpu_seconds(front_end), cpu_seconds(engine))
            served = max(served_tok_s(server, workload, tokenizer, 1000 * round_no + run)
                         for run in range(args.runs))
            after = (time.process_time(), cpu_seconds(front_end), cpu_seconds(engine))
            # (ignore_eos: every request streams its output_len tokens)
            num_tokens = args.runs * workload.num_prompts * workload.output_len
            client_us, front_end_us, engine_us = (1e6 * (b - a) / num_tokens
                                                  for a, b in zip(before, after, strict=True))
            offline = in_process_tok_s(args.dtype, workload.num_prompts, workload.input_len,
                                       workload.output_len, workload.concurrency, args.runs)
            ratios.append(served / offline)
            print(f"round {round_no}: served {served:7.1f} tok/s, in process {offline:7.1f} "
                  f"tok/s: {served / offline:.3f}; CPU a streamed token: client "
                  f"{client_us:.0f} us, front end {front_end_us:.0f} us, engine "
                  f"{engine_us:.0f} us", flush=True)
    print(f"served / in process, median of {args.rounds} rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
