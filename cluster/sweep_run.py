"""One point of a sweep: its workload and its `simulate` run, summed up in one table row.

`run_point` is what a Ray task (or the in-process fallback) executes; it never raises: a point
that cannot run comes back as a row with status "error" and the error in one line.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Mapping
from typing import Any

from cluster.results import Slo, Summary
from cluster.sweep_spec import SYNTHETIC_KEYS, WorkloadSource, point_id
from cluster.workload import Workload, read_azure_csv, read_sharegpt_json, shape, synthetic

# The metric columns of a row, after point_id, status, error and the point's options (no name
# of an option: a row holds both).
METRIC_COLUMNS = (
    "num_npus", "num_finished", "num_rejected", "offered_rate", "duration_s",
    "request_throughput", "output_throughput", "goodput", "goodput_per_npu", "slo_attainment",
    "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p99_s", "e2e_p99_s",
    "queue_p99_s", "num_preemptions", "max_kv_cache_usage", "meets_slo", "wall_s",
    "sim_to_wall",
)
ENGINE_OPTION_NAMES = {"max_num_seqs": "max_num_seqs",
                       "max_num_batched_tokens": "max_num_batched_tokens",
                       "mixed_prefill_budget": "mixed_prefill_budget",
                       "max_model_len": "max_model_len", "block_size": "block_size",
                       "num_kv_blocks": "num_kv_blocks",
                       "enable_prefix_caching": "enable_prefix_caching",
                       "scheduling_policy": "policy", "stack": "npu_stack",
                       "npu_dtype": "npu_dtype", "npu": "npu", "seed": "seed",
                       "speculative": "speculative",
                       "num_speculative_tokens": "num_speculative_tokens"}


def load_base_workload(source: WorkloadSource) -> Workload | None:
    """The trace as read (shaped per point later); None for a synthetic workload (drawn per
    point at its rate). Raises WorkloadError."""
    if source.trace is None:
        return None
    if source.trace.lower().endswith(".json"):
        return read_sharegpt_json(source.trace, 1.0)  # arrivals redrawn per point
    return read_azure_csv(source.trace)


def point_workload(point: Mapping[str, Any], source: WorkloadSource, base: Workload | None,
                   max_model_len: int) -> Workload:
    """The point's requests: the trace (or a draw) with its rate, window and length policy."""
    rate = point.get("request_rate")
    seed = point.get("seed", 0)
    time_scale = float(point.get("time_scale", 1.0))
    if source.synthetic is not None:
        args = {k: source.synthetic[k] for k in SYNTHETIC_KEYS if k in source.synthetic}
        workload = synthetic(int(point.get("num_requests", args.pop("num_requests", 1000))),
                             float(rate or math.inf), str(args.pop("input_len", "512")),
                             str(args.pop("output_len", "128")), seed,
                             args.get("arrivals", "poisson"), float(args.get("burstiness", 1)))
        num_requests = None
    else:
        assert base is not None and source.trace is not None
        workload, num_requests = base, point.get("num_requests")
        if source.trace.lower().endswith(".json"):
            workload = read_sharegpt_json(source.trace, float(rate or math.inf), seed)
        elif rate is not None:  # the trace's own mean rate becomes `rate`
            span_s = max(workload.duration_s, 1e-9)
            time_scale *= len(workload.requests) / span_s / float(rate)
    return shape(workload, num_requests=num_requests, duration_s=point.get("duration"),
                 time_scale=time_scale, max_model_len=max_model_len,
                 long_policy=point.get("long_requests", "drop"),
                 start_s=float(point.get("start", 0.0)))


def run_point(point: Mapping[str, Any], source: WorkloadSource, base: Workload | None,
              slo: Slo | None) -> dict[str, Any]:
    """Simulate one point; its row (status ok, or error with the reason)."""
    row: dict[str, Any] = {"point_id": point_id(point, source), "status": "ok", "error": "",
                           **point}
    start_s = time.perf_counter()
    try:
        summary, workload = _simulate(point, source, base, slo)
    except Exception as exc:  # any failure is this point's, reported while the others run
        last = traceback.extract_tb(exc.__traceback__)[-1]
        row.update(status="error", wall_s=time.perf_counter() - start_s,
                   error=f"{type(exc).__name__}: {exc} ({last.filename.rsplit('/', 1)[-1]}:"
                         f"{last.lineno})".replace("\n", " "))
        return row
    row.update(summary_row(summary, slo))
    window_s = workload.duration_s - workload.requests[0].arrival_s
    row["offered_rate"] = len(workload.requests) / window_s if window_s > 0 else math.inf
    row["wall_s"] = time.perf_counter() - start_s
    return row


def _simulate(point: Mapping[str, Any], source: WorkloadSource, base: Workload | None,
              slo: Slo | None) -> tuple[Summary, Workload]:
    from cluster.cluster_sim import ClusterConfig, ClusterSimulation
    from cluster.routing import RouterConfig

    options = {ENGINE_OPTION_NAMES[k]: v for k, v in point.items() if k in ENGINE_OPTION_NAMES}
    cluster = ClusterConfig(num_replicas=int(point.get("replicas", 1)),
                            num_prefill_replicas=int(point.get("prefill_replicas", 0)),
                            num_decode_replicas=int(point.get("decode_replicas", 0)),
                            router=RouterConfig(point.get("router", "round-robin")),
                            kv_link=point.get("kv_link", "auto"))
    sim = ClusterSimulation(point["model"], cluster,
                            acceptance_rate=float(point.get("acceptance_rate", 0.7)),
                            kv_reserve_fraction=float(point.get("kv_reserve_fraction", 0.1)),
                            tensor_parallel_size=int(point.get("tensor_parallel_size", 1)),
                            **options)
    workload = point_workload(point, source, base, sim.max_model_len)
    return sim.run(workload, slo).summary, workload


def summary_row(s: Summary, slo: Slo | None) -> dict[str, Any]:
    """The metric columns of a finished point."""
    meets = None
    if slo is not None:
        meets = ((slo.ttft_s is None or s.ttft_s["p99"] <= slo.ttft_s)
                 and (slo.tpot_s is None or s.tpot_s["p99"] <= slo.tpot_s)
                 and s.num_requests > 0)
    return {
        "num_npus": s.num_npus, "num_finished": s.num_requests, "num_rejected": s.num_rejected,
        "offered_rate": math.nan,  # the caller knows the workload's window
        "duration_s": s.duration_s, "request_throughput": s.request_throughput,
        "output_throughput": s.output_throughput, "goodput": s.goodput,
        "goodput_per_npu": None if s.goodput is None else s.goodput / s.num_npus,
        "slo_attainment": s.slo_attainment,
        "ttft_p50_s": s.ttft_s["p50"], "ttft_p99_s": s.ttft_s["p99"],
        "tpot_p50_s": s.tpot_s["p50"], "tpot_p99_s": s.tpot_s["p99"],
        "itl_p99_s": s.itl_s["p99"], "e2e_p99_s": s.e2e_s["p99"], "queue_p99_s": s.queue_s["p99"],
        "num_preemptions": s.num_preemptions, "max_kv_cache_usage": s.max_kv_cache_usage,
        "meets_slo": meets, "sim_to_wall": s.sim_to_wall,
    }
