"""`xyserve simulate`: replay a trace (or a drawn workload) on simulated Ascend NPUs.

    xyserve simulate --model llama-2-7b --trace AzureLLMInferenceTrace_conv.csv \\
        --max-num-batched-tokens 2048 --max-num-seqs 256 --max-model-len 16384 --out results/
    xyserve simulate --model qwen2.5-7b --synthetic --request-rate 4 --num-requests 500 \\
        --input-len lognormal:mean=800,sigma=0.6 --output-len 200 --slo ttft=2,tpot=0.1
    xyserve simulate --model llama-3-70b -tp 4 --replicas 4 --router least-loaded --trace ...
    xyserve simulate --model llama-3-70b -tp 4 --prefill-replicas 2 --decode-replicas 2 ...

Engine options are serve's (engine.cli_args, the same defaults); the summary goes to stdout as a
table and, with --out, to summary.json beside requests.csv, steps.csv and the plots.
Usage errors exit 2 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from cluster.routing import ROUTER_POLICIES
from engine.cli_args import (
    add_config_argument,
    add_npu_arguments,
    add_scheduler_arguments,
    add_speculative_arguments,
    engine_config,
)

DEFAULT_SIM_MODEL = "llama-2-7b"


def add_simulate_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate", help="replay a trace on simulated Ascend NPUs (timing only, any model size)",
        description="Run a workload through the serving engine with a timing-only runner: the "
                    "same scheduler, KV cache, lowering and NPU cost model as `serve`, no "
                    "weights. Latencies are simulated seconds.")
    add_config_argument(p)
    p.add_argument("--model", default=DEFAULT_SIM_MODEL,
                   help="a model preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, "
                        "llama-3-70b, qwen2.5-7b, qwen2.5-72b, qwen3-8b) or a Hugging Face "
                        "config.json (file or directory; weights are never read) "
                        "(default: %(default)s)")
    w = p.add_argument_group("workload")
    source = w.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE",
                        help="an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, "
                             "GeneratedTokens) or a ShareGPT-style JSON (arrivals drawn at "
                             "--request-rate)")
    source.add_argument("--synthetic", action="store_true",
                        help="draw arrivals at --request-rate and lengths from --input-len / "
                             "--output-len")
    w.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="requests per second for drawn arrivals; inf: all at time 0 "
                        "(default: %(default)s)")
    w.add_argument("--arrivals", choices=("poisson", "gamma"), default="poisson",
                   help="arrival process (default: %(default)s)")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma arrivals' shape: 1 = Poisson, below 1 burstier "
                        "(default: %(default)s)")
    w.add_argument("--input-len", default="512",
                   help="synthetic prompt lengths: N, uniform:low=A,high=B or "
                        "lognormal:mean=M,sigma=S (default: %(default)s)")
    w.add_argument("--output-len", default="128",
                   help="synthetic output lengths, as --input-len (default: %(default)s)")
    w.add_argument("--tokenizer", metavar="DIR",
                   help="a local Hugging Face tokenizer to measure a ShareGPT JSON's texts "
                        "(without one, records need prompt_len / output_len fields)")
    w.add_argument("--num-requests", type=int, metavar="N",
                   help="the first N requests (synthetic: how many to draw; default 1000)")
    w.add_argument("--start", type=float, default=0.0, metavar="SECONDS",
                   help="the window starts this many (scaled) seconds into the trace "
                        "(default: %(default)s)")
    w.add_argument("--duration", type=float, metavar="SECONDS",
                   help="only requests arriving within this many (scaled) seconds of the "
                        "window's start")
    w.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times: 2 stretches the trace to half the rate, 0.5 "
                        "doubles it (default: %(default)s)")
    w.add_argument("--long-requests", choices=("drop", "clip"), default="drop",
                   help="requests whose prompt + output exceed --max-model-len are dropped or "
                        "clipped (output first), and counted (default: %(default)s)")
    add_scheduler_arguments(p, kv_budget=False)
    n = add_npu_arguments(p)
    n.add_argument("--tensor-parallel-size", "-tp", type=int, choices=(1, 2, 4, 8), default=1,
                   help="NPUs of one node the model is sharded over (Megatron-style; the "
                        "all-reduces over HCCS are simulated) (default: %(default)s)")
    n.add_argument("--gemm-policy", choices=("virtual", "bucket"), default="virtual",
                   help="GEMM lowering: virtual (XY-Serve's SmoothGEMM: menu tiles over the real "
                        "M) or bucket (the baseline: M padded to a static bucket, ATB's tiling) "
                        "(default: %(default)s)")
    n.add_argument("--attention-policy", choices=("meta", "split"), default="meta",
                   help="attention lowering: meta (one meta-kernel for every row kind, tasks "
                        "balanced by cost) or split (the baseline: separate PFA / IFA-style "
                        "prefill and decode kernels). The whole baseline is --gemm-policy bucket "
                        "--attention-policy split --scheduling-policy prefill_first "
                        "(default: %(default)s)")
    n.add_argument("--kv-reserve-fraction", type=float, default=0.1, metavar="F",
                   help="HBM kept back from the KV pool for activations and workspaces "
                        "(vLLM's gpu_memory_utilization is 1 - F) (default: %(default)s)")
    c = p.add_argument_group("cluster")
    c.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="engines (each --tensor-parallel-size NPUs) behind a router, on one "
                        "simulated clock (default: %(default)s)")
    c.add_argument("--router", choices=ROUTER_POLICIES, default="round-robin",
                   help="how arrivals are spread: round-robin, least-loaded (fewest outstanding "
                        "tokens), prefix-aware (longest cached prefix within a load bound) "
                        "(default: %(default)s)")
    c.add_argument("--prefill-replicas", type=int, default=0, metavar="P",
                   help="P/D disaggregation: prefill-only engines handing each request's KV to "
                        "--decode-replicas (replaces --replicas)")
    c.add_argument("--decode-replicas", type=int, default=0, metavar="D",
                   help="P/D disaggregation: decode (and verify) engines")
    c.add_argument("--kv-link", choices=("auto", "hccs", "roce"), default="auto",
                   help="P/D: the KV transfer's link, HCCS inside a node or RoCE between nodes; "
                        "auto: HCCS when all NPUs fit one node (default: %(default)s)")
    add_speculative_arguments(p)
    p.add_argument_group("speculative decoding").add_argument(
        "--acceptance-rate", type=float, default=0.7, metavar="A",
        help="simulated drafts: probability that each draft position is accepted, given the "
             "previous one was (default: %(default)s)")
    o = p.add_argument_group("results")
    o.add_argument("--slo", metavar="ttft=S,tpot=S",
                   help="service-level objective for goodput, in seconds (e.g. ttft=2,tpot=0.1)")
    o.add_argument("--out", metavar="DIR",
                   help="write summary.json, requests.csv, steps.csv and plots here")
    o.add_argument("--no-plots", action="store_true", help="with --out: skip the plots")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar in simulated time (default: when stderr is a terminal)")
    o.add_argument("--prefetch-heads", action=argparse.BooleanOptionalAction, default=None,
                   help="a worker process builds each token count's shared launches ahead, on "
                        "another core (the same results; default: one engine, Linux, a second "
                        "core free)")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    """Build the workload and the engine (every bad option is one line, exit 2), run, report."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from cluster.cluster_sim import ClusterConfig, ClusterSimulation
    from cluster.results import Slo
    from cluster.routing import RouterConfig
    from cluster.workload import WorkloadError
    from engine.arch import ModelLoadError

    try:
        slo = Slo.parse(args.slo) if args.slo else None
        if not 0.0 <= args.kv_reserve_fraction < 1.0:
            raise ValueError(f"--kv-reserve-fraction must be in [0, 1), got "
                             f"{args.kv_reserve_fraction}")
        if args.prefill_replicas and args.replicas != 1:
            raise ValueError("--replicas and --prefill-replicas / --decode-replicas exclude "
                             "each other")
        cluster = ClusterConfig(num_replicas=args.replicas,
                                num_prefill_replicas=args.prefill_replicas,
                                num_decode_replicas=args.decode_replicas,
                                router=RouterConfig(args.router), kv_link=args.kv_link)
        sim = ClusterSimulation(args.model, cluster, config=engine_config(args),
                                prefetch_heads=args.prefetch_heads,
                                acceptance_rate=args.acceptance_rate,
                                kv_reserve_fraction=args.kv_reserve_fraction,
                                tensor_parallel_size=args.tensor_parallel_size,
                                lowering=lowering_policy(args.gemm_policy,
                                                         args.attention_policy,
                                                         _npu_weights(args.npu_weights)))
        workload = _workload(args, sim.max_model_len)
    except (ModelLoadError, WorkloadError, ValueError) as exc:
        print(f"xyserve simulate: error: {exc}", file=sys.stderr)
        return 2
    progress = _progress(args, workload)
    try:
        result = sim.run(workload, slo, None if progress is None else progress.advance)
    finally:
        if progress is not None:
            progress.close()
    from cluster.results import format_replicas, format_table

    print(format_table(result.summary))
    if len(result.replicas) > 1:
        print(format_replicas([r.name for r in result.replicas], result.replica_summaries))
    for rejected in result.rejected[:5]:
        print(f"rejected request {rejected.index}: {rejected.reason}", file=sys.stderr)
    if args.out:
        paths = result.write(args.out, plots=not args.no_plots)
        print(f"results: {', '.join(str(p) for p in paths)}")
    return 0


def _npu_weights(choice: str) -> str:
    """--npu-weights of a simulation: auto is bf16 (no served weights to follow)."""
    return "bf16" if choice == "auto" else choice


def lowering_policy(gemm: str, attention: str, weights: str = "bf16") -> Any:
    """The engine.lowering.LoweringPolicy of --gemm-policy / --attention-policy /
    --npu-weights."""
    from engine.lowering import AttentionPolicy, GemmPolicy, LoweringPolicy

    return LoweringPolicy(GemmPolicy(gemm), AttentionPolicy(attention), weights=weights)


def _workload(args: argparse.Namespace, max_model_len: int) -> Any:
    from cluster import workload as wl

    if args.synthetic:
        base = wl.synthetic(args.num_requests or 1000, args.request_rate, args.input_len,
                            args.output_len, args.seed, args.arrivals, args.burstiness)
    elif args.trace.lower().endswith(".json"):
        tokenizer = None
        if args.tokenizer:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer,
                                                                   local_files_only=True)
        base = wl.read_sharegpt_json(args.trace, args.request_rate, args.seed, tokenizer,
                                     args.arrivals, args.burstiness)
    else:
        base = wl.read_azure_csv(args.trace)
    return wl.shape(base, num_requests=None if args.synthetic else args.num_requests,
                    duration_s=args.duration, time_scale=args.time_scale,
                    start_s=args.start,
                    max_model_len=max_model_len, long_policy=args.long_requests)


def _progress(args: argparse.Namespace, workload: Any) -> SimProgress | None:
    """The run's progress bar (--progress; default: when stderr is a terminal), or None."""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    return SimProgress(workload.duration_s) if show else None


class SimProgress:
    """A progress bar in simulated time: `advance` is the driver's on_step (called after every
    step), `close` ends the bar at the last simulated time it was given.

    The bar is redrawn at most every REDRAW_S of wall time, and a call between redraws only
    reads the clock: a full-trace run makes ~78,000 steps, and tqdm's own update on each of them
    cost ~4 us a step (~0.3 s, 3-4% of the run)."""

    REDRAW_S = 0.25

    def __init__(self, duration_sim_s: float, clock: Callable[[], float] = time.monotonic,
                 file: Any = None) -> None:
        """duration_sim_s: the bar's total, the workload's arrivals' span (a run goes on past
        it until its last request ends). clock: wall seconds. file: where the bar is drawn
        (None: stderr)."""
        from tqdm.auto import tqdm

        self._bar = tqdm(total=round(duration_sim_s, 1) or None, unit="sim s", desc="simulate",
                         mininterval=0.0, file=file)
        self._clock = clock
        self._next_redraw_s = -math.inf  # (the first step draws)
        self._now_sim_s = 0.0  # the latest step's end on the simulated clock

    def advance(self, now_sim_s: float) -> None:
        self._now_sim_s = now_sim_s
        now_s = self._clock()
        if now_s >= self._next_redraw_s:
            self._next_redraw_s = now_s + self.REDRAW_S
            self._draw()

    def close(self) -> None:
        self._bar.n = round(self._now_sim_s, 1)
        self._bar.close()  # (drawn once more, as it ends)

    def _draw(self) -> None:
        self._bar.n = round(self._now_sim_s, 1)
        self._bar.refresh()
