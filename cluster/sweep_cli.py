"""`xyserve sweep SWEEP.yaml`: many `simulate` runs over a grid of configurations, fanned out as
Ray tasks, into one table, with the capacity answer and a Pareto plot.

    xyserve sweep sweep.yaml --out results/sweep.csv --slo ttft=2,tpot=0.1
    xyserve sweep sweep.yaml --out results/sweep.csv --resume          # after an interruption
    xyserve sweep sweep.yaml --out results/sweep.csv --ray-address auto  # an existing cluster

Usage errors exit 2 with one line naming the problem; a failed point is a row with its error
(the others run on) and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def add_sweep_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep", help="simulate a grid of cluster configurations on one trace (Ray tasks) and "
                      "find the cheapest that meets an SLO",
        description="Run every point of SWEEP.yaml (a grid or list over model, chip, TP, "
                    "replicas, P/D split, batch limits, stack and request rate) as one "
                    "`simulate` run, each a Ray task; stream the rows into one CSV (and a JSON "
                    "beside it), then print the cheapest configuration meeting the SLO and "
                    "plot goodput per NPU against TTFT p99 / TPOT p99.")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep (cluster/sweep_spec.py)")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="the results table; NAME.json and NAME_pareto.png go beside it")
    p.add_argument("--slo", metavar="ttft=S,tpot=S",
                   help="the SLO to answer for (default: the sweep file's slo)")
    p.add_argument("--resume", action="store_true",
                   help="skip the points --out already holds as finished")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="run on an existing Ray cluster (e.g. auto, or ray://host:10001); "
                        "default: start Ray on this machine")
    p.add_argument("--workers", type=int, metavar="N",
                   help="points at once on the local Ray (default: all cores)")
    p.add_argument("--no-ray", action="store_true",
                   help="run the points one after another in this process")
    p.add_argument("--no-plot", action="store_true", help="skip the Pareto plot")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar over the points (default: when stderr is a terminal)")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from cluster.capacity import format_answers, write_pareto
    from cluster.results import Slo
    from cluster.sweep_exec import ExecOptions, run_sweep
    from cluster.sweep_spec import SweepError, check_workload_loadable, load_sweep

    try:
        spec = load_sweep(args.sweep)
        slo = Slo.parse(args.slo) if args.slo else spec.slo
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if args.ray_address and args.no_ray:
            raise ValueError("--ray-address and --no-ray exclude each other")
        if args.ray_address and not _has_ray():
            raise ValueError("--ray-address needs ray: pip install 'xyserve[cluster]'")
        check_workload_loadable(spec)
    except (SweepError, ValueError) as exc:
        print(f"xyserve sweep: error: {exc}", file=sys.stderr)
        return 2
    from dataclasses import replace

    spec = replace(spec, slo=slo)
    out = Path(args.out)
    options = ExecOptions(use_ray=not args.no_ray, ray_address=args.ray_address,
                          num_workers=args.workers, resume=args.resume,
                          progress=args.progress if args.progress is not None
                          else sys.stderr.isatty())
    import time

    start_s = time.perf_counter()
    try:
        rows = run_sweep(spec, out, options)
    except ValueError as exc:  # --resume against another sweep's table
        print(f"xyserve sweep: error: {exc}", file=sys.stderr)
        return 2
    wall_s = time.perf_counter() - start_s
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} points ({failed} failed) in {wall_s:.1f} s wall: {out}, "
          f"{out.with_suffix('.json')}")
    print(format_answers(rows, slo))
    if not args.no_plot and len(rows) > failed:
        plot = write_pareto(rows, slo, out.with_name(out.stem + "_pareto.png"),
                            f"{spec.workload.name}: goodput per NPU vs tail latency")
        print(f"plot: {plot}")
    return 1 if failed else 0


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None
