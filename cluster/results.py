"""A simulation's results: the summary (what `summary.json` holds and stdout shows), the
per-request and per-step CSVs. Latencies are simulated seconds; `wall_s` is what this CPU took.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.recorder import STEP_COLUMNS, Recorder, RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """A service-level objective a request meets when both bounds hold (None = no bound)."""

    ttft_s: float | None = None  # time to first token at most
    tpot_s: float | None = None  # mean time per output token after the first at most

    def met_by(self, r: RequestRecord) -> bool:
        if self.ttft_s is not None and not r.ttft_s <= self.ttft_s:
            return False
        return self.tpot_s is None or r.num_output_tokens < 2 or r.tpot_s <= self.tpot_s

    @staticmethod
    def parse(text: str) -> Slo:
        """`ttft=2,tpot=0.1` (seconds; a unit `ms` or `s` may follow a number)."""
        bounds: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name.strip() not in ("ttft", "tpot"):
                raise ValueError(f"SLO {text!r}: expected ttft=SECONDS,tpot=SECONDS")
            value = value.strip()
            scale = 1e-3 if value.endswith("ms") else 1.0
            try:
                seconds = float(value.removesuffix("ms").removesuffix("s")) * scale
            except ValueError:
                raise ValueError(f"SLO {text!r}: {value!r} is not a number of seconds") from None
            if not seconds > 0:
                raise ValueError(f"SLO {text!r}: {name} must be positive")
            bounds[name.strip() + "_s"] = seconds
        return Slo(**bounds)


def distribution(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """{mean, p50, p90, p99} of the finite values (nan when there are none)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    if not len(a):
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    return {"mean": float(a.mean()),
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES),
                                                  strict=True)}}


@dataclass(frozen=True)
class Summary:
    """The summary of one simulation (field names are the JSON keys scripts rely on)."""

    model: str  # what was simulated
    chip: str  # the simulated NPU
    workload: str  # where the requests came from
    num_requests: int  # requests that finished
    num_rejected: int  # requests the engine could never serve (skipped)
    num_dropped: int  # requests longer than max_model_len, dropped
    num_clipped: int  # requests longer than max_model_len, clipped
    duration_s: float  # simulated: first arrival to last finish
    request_throughput: float  # finished requests per simulated second
    output_throughput: float  # generated tokens per simulated second
    total_throughput: float  # prompt + generated tokens per simulated second
    ttft_s: dict[str, float]  # time to first token {mean, p50, p90, p99}
    tpot_s: dict[str, float]  # time per output token after the first, per request
    itl_s: dict[str, float]  # every inter-token gap
    e2e_s: dict[str, float]  # arrival to last token
    queue_s: dict[str, float]  # arrival to first scheduled
    num_preemptions: int  # requests preempted (recomputed later)
    num_steps: int  # engine steps
    mean_batch_tokens: float  # tokens scheduled per step
    max_batch_tokens: int
    max_kv_cache_usage: float  # peak fraction of KV blocks in use
    npu_utilization: dict[str, float]  # kernel time by primitive / simulated duration
    host_overhead_share: float  # modelled host time / all step time
    wall_s: float  # wall seconds the simulation loop took
    steps_per_s: float  # engine steps per wall second
    requests_per_s: float  # requests simulated per wall second
    sim_to_wall: float  # simulated seconds per wall second
    slo: dict[str, float | None] = field(default_factory=dict)  # the SLO, when one was given
    goodput: float | None = None  # requests meeting the SLO per simulated second
    slo_attainment: float | None = None  # fraction of finished requests meeting it
    num_replicas: int = 1  # engines simulated side by side (replicas, or prefill + decode)
    num_npus: int = 1  # cards they occupy (replicas x tensor-parallel size): the cost

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=True)


def summarize(recorder: Recorder, *, model: str, chip: str, workload: str, num_rejected: int,
              num_dropped: int = 0, num_clipped: int = 0, slo: Slo | None = None,
              num_replicas: int = 1, num_npus: int = 1) -> Summary:
    """The summary of a recorder's requests and steps; with several replicas, NPU utilization
    is per replica (all their kernel time over num_replicas x the duration)."""
    done = [r for r in recorder.requests.values() if r.finish_reason]
    steps = np.asarray(recorder.steps, dtype=np.float64).reshape(-1, len(STEP_COLUMNS))
    start = min((r.arrival_s for r in recorder.requests.values()), default=0.0)
    end = float(steps[:, 1].max()) if len(steps) else start
    duration = max(end - start, 1e-12)
    batch = steps[:, 4] + steps[:, 5] if len(steps) else np.zeros(0)
    out_tokens = sum(r.num_output_tokens for r in done)
    step_time = float(steps[:, 2].sum()) if len(steps) else 0.0
    wall = max(recorder.wall_s, 1e-12)
    good = None if slo is None else sum(slo.met_by(r) for r in done)
    return Summary(
        model=model, chip=chip, workload=workload, num_requests=len(done),
        num_rejected=num_rejected, num_dropped=num_dropped, num_clipped=num_clipped,
        duration_s=duration, request_throughput=len(done) / duration,
        output_throughput=out_tokens / duration,
        total_throughput=(out_tokens + sum(r.prompt_len for r in done)) / duration,
        ttft_s=distribution([r.ttft_s for r in done]),
        tpot_s=distribution([r.tpot_s for r in done]),
        itl_s=distribution(np.frombuffer(recorder.itls_s, dtype=np.float64)),
        e2e_s=distribution([r.e2e_s for r in done]),
        queue_s=distribution([r.queue_s for r in done]),
        num_preemptions=recorder.num_preemptions, num_steps=len(steps),
        mean_batch_tokens=float(batch.mean()) if len(batch) else 0.0,
        max_batch_tokens=int(batch.max()) if len(batch) else 0,
        max_kv_cache_usage=recorder.max_kv_usage,
        npu_utilization={k: v / (duration * num_replicas)
                         for k, v in sorted(recorder.kernel_s.items())},
        host_overhead_share=recorder.host_s / step_time if step_time else 0.0,
        wall_s=recorder.wall_s, steps_per_s=len(steps) / wall,
        requests_per_s=len(done) / wall, sim_to_wall=duration / wall,
        slo={} if slo is None else asdict(slo),
        goodput=None if good is None else good / duration,
        slo_attainment=None if good is None else good / max(len(done), 1),
        num_replicas=num_replicas, num_npus=num_npus)


def format_table(s: Summary) -> str:
    """The summary as the plain-text table `xyserve simulate` prints."""
    def ms(d: Mapping[str, float]) -> str:
        return "  ".join(f"{k} {v * 1e3:9.2f}" for k, v in d.items())

    rows: list[tuple[str, str]] = [
        ("model / chip", f"{s.model} on {s.chip}"),
        ("workload", s.workload),
        ("requests", f"{s.num_requests} finished, {s.num_rejected} rejected, "
                     f"{s.num_dropped} dropped, {s.num_clipped} clipped"),
        ("simulated duration", f"{s.duration_s:.2f} s"),
        ("throughput", f"{s.request_throughput:.3f} req/s, {s.output_throughput:.1f} output "
                       f"tok/s, {s.total_throughput:.1f} total tok/s"),
    ]
    if s.goodput is not None:
        rows.append(("goodput", f"{s.goodput:.3f} req/s ({100 * (s.slo_attainment or 0):.1f}% "
                                f"meet {s.slo})"))
    rows += [
        ("TTFT (ms)", ms(s.ttft_s)), ("TPOT (ms)", ms(s.tpot_s)), ("ITL (ms)", ms(s.itl_s)),
        ("E2E (ms)", ms(s.e2e_s)), ("queueing (ms)", ms(s.queue_s)),
        ("preemptions", str(s.num_preemptions)),
        ("batch tokens", f"mean {s.mean_batch_tokens:.1f}, max {s.max_batch_tokens}"),
        ("KV cache usage peak", f"{100 * s.max_kv_cache_usage:.1f}%"),
        ("NPU busy by primitive", ", ".join(f"{k} {100 * v:.1f}%"
                                            for k, v in s.npu_utilization.items())),
        ("host overhead share", f"{100 * s.host_overhead_share:.1f}% of step time"),
        ("simulator speed", f"{s.num_steps} steps in {s.wall_s:.2f} s wall: {s.steps_per_s:.0f} "
                            f"steps/s, {s.requests_per_s:.0f} req/s, {s.sim_to_wall:.1f}x real "
                            f"time"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_replicas(names: Sequence[str], summaries: Sequence[Summary]) -> str:
    """One line per replica: what it ran, as it saw its own requests (a decode replica's TTFT
    is to its first token, after the hand-off)."""
    lines = ["per replica        requests   steps  TTFT p99 ms  TPOT p99 ms  KV peak  busy"]
    for name, s in zip(names, summaries, strict=True):
        busy = sum(s.npu_utilization.values())
        lines.append(f"{name:<18} {s.num_requests:>8} {s.num_steps:>7} "
                     f"{s.ttft_s['p99'] * 1e3:>12.2f} {s.tpot_s['p99'] * 1e3:>12.2f} "
                     f"{100 * s.max_kv_cache_usage:>7.1f}% {100 * busy:>5.1f}%")
    return "\n".join(lines)


def write_csvs(recorder: Recorder, out_dir: Path) -> tuple[Path, Path]:
    """requests.csv (one row per request) and steps.csv (one row per step) in out_dir."""
    requests_path, steps_path = out_dir / "requests.csv", out_dir / "steps.csv"
    fields = ("index", "arrival_s", "prompt_len", "output_len", "queue_s", "ttft_s", "tpot_s",
              "e2e_s", "num_output_tokens", "finish_reason")
    with requests_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in sorted(recorder.requests.values(), key=lambda r: r.index):
            w.writerow([getattr(r, name) for name in fields])
    with steps_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STEP_COLUMNS)
        w.writerows(recorder.steps)
    return requests_path, steps_path


def write_json(summary: Summary, path: Path, extra: Mapping[str, Any] | None = None) -> Path:
    data = asdict(summary) | dict(extra or {})
    path.write_text(json.dumps(data, indent=2))
    return path
