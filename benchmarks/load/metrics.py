"""Benchmark metrics: throughput, latency percentiles, goodput, and the server's own figures.

Client-side (wall clock, as `vllm bench serve` reports them): request, output-token and
total-token throughput over the run; TTFT, TPOT, ITL and E2E latency mean / median / chosen
percentiles; goodput = completed requests per second that met every SLO.

Server-side: when the server exports Prometheus metrics, `/metrics` is read before and after the
run and the difference of each histogram (`_sum`, `_count`, buckets) and counter is kept. For
xyserve that includes the simulated NPU's clock (`xyserve:npu_step_seconds`,
`xyserve:npu_time_to_first_token_seconds`, `xyserve:npu_inter_token_latency_seconds`): what
the same run would have taken on the simulated chip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.load.client import RequestResult

SLO_KEYS = ("ttft", "tpot", "e2e")  # SLOs in milliseconds: --slo ttft=500,tpot=50


def parse_slo(text: str | None) -> dict[str, float]:
    """`"ttft=500,tpot=50"` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"SLO {part!r}: expected one of {', '.join(SLO_KEYS)} as key=ms")
        slo[key] = float(value)
        if slo[key] <= 0:
            raise ValueError(f"SLO {key} must be positive, got {value}")
    return slo


def summarize(values_s: Iterable[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean / std / median / p<x> of seconds, in milliseconds (zeros when empty)."""
    ms = np.asarray(list(values_s), dtype=np.float64) * 1000.0
    out = {"mean": 0.0, "std": 0.0, "median": 0.0}
    out.update({f"p{_fmt(p)}": 0.0 for p in percentiles})
    if ms.size:
        out["mean"], out["std"], out["median"] = (float(ms.mean()), float(ms.std()),
                                                  float(np.median(ms)))
        for p in percentiles:
            out[f"p{_fmt(p)}"] = float(np.percentile(ms, p))
    return out


def _fmt(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    got = {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2e": r.e2e_s}
    return r.success and all(got[k] * 1000.0 <= limit for k, limit in slo.items())


def client_metrics(results: Sequence[RequestResult], duration_s: float,
                   percentiles: Sequence[float], slo: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    num_input = sum(r.prompt_len for r in ok)
    num_output = sum(r.output_len for r in ok)
    duration_s = max(duration_s, 1e-9)
    out: dict[str, Any] = {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": num_output / duration_s,
        "total_token_throughput": (num_input + num_output) / duration_s,
        "ttft_ms": summarize((r.ttft_s for r in ok), percentiles),
        "tpot_ms": summarize((r.tpot_s for r in ok if r.output_len > 1), percentiles),
        "itl_ms": summarize((x for r in ok for x in r.itls_s), percentiles),
        "e2e_ms": summarize((r.e2e_s for r in ok), percentiles),
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in ok)
        out["slo_ms"] = slo
        out["good_requests"] = good
        out["request_goodput"] = good / duration_s
    return out


# ------------------------------------------------------------------------- server metrics


@dataclass
class Histogram:
    sum: float = 0.0
    count: float = 0.0
    buckets: dict[float, float] | None = None  # upper bound -> cumulative count

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear within the bucket holding rank q * count."""
        if not self.buckets or self.count <= 0:
            return math.nan
        bounds = sorted(self.buckets)
        rank = q * self.count
        prev_bound, prev_count = 0.0, 0.0
        for bound in bounds:
            count = self.buckets[bound]
            if count >= rank:
                if math.isinf(bound):
                    return prev_bound
                width = count - prev_count
                return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width
                                                            if width > 0 else 1.0)
            prev_bound, prev_count = bound, count
        return bounds[-1]


def scrape(text: str) -> tuple[dict[str, Histogram], dict[str, float]]:
    """Histograms and counters / gauges of a Prometheus exposition, summed over label sets
    (buckets are kept per `le`)."""
    from prometheus_client.parser import text_string_to_metric_families

    histograms: dict[str, Histogram] = {}
    scalars: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            h = histograms.setdefault(family.name, Histogram(buckets={}))
            for s in family.samples:
                if s.name.endswith("_sum"):
                    h.sum += s.value
                elif s.name.endswith("_count"):
                    h.count += s.value
                elif s.name.endswith("_bucket") and h.buckets is not None:
                    le = float(s.labels["le"])
                    h.buckets[le] = h.buckets.get(le, 0.0) + s.value
        elif family.type != "summary":  # counters, gauges, untyped
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                scalars[s.name] = scalars.get(s.name, 0.0) + s.value
    return histograms, scalars


def server_metrics_delta(before: str, after: str) -> dict[str, Any]:
    """Per-histogram {count, sum, mean, p50, p99} and per-counter increases over the run."""
    h0, c0 = scrape(before)
    h1, c1 = scrape(after)
    histograms = {}
    for name, h in h1.items():
        b = h0.get(name, Histogram(buckets={}))
        delta = Histogram(sum=h.sum - b.sum, count=h.count - b.count,
                          buckets={le: v - (b.buckets or {}).get(le, 0.0)
                                   for le, v in (h.buckets or {}).items()})
        if delta.count <= 0:
            continue
        histograms[name] = {"count": delta.count, "sum": delta.sum,
                            "mean": delta.sum / delta.count,
                            "p50": delta.quantile(0.5), "p99": delta.quantile(0.99)}
    counters = {name: v - c0.get(name, 0.0) for name, v in c1.items()
                if name.endswith("_total") and v - c0.get(name, 0.0) > 0}
    return {"histograms": histograms, "counters": counters}


NPU_FIGURES = (  # (label, histogram name): the simulated-NPU summary a bench run prints
    ("NPU TTFT", "xyserve:npu_time_to_first_token_seconds"),
    ("NPU ITL", "xyserve:npu_inter_token_latency_seconds"),
    ("NPU step", "xyserve:npu_step_seconds"),
)


def npu_summary(server: dict[str, Any]) -> dict[str, float]:
    """The simulated NPU's view of the run (xyserve only; empty for other servers)."""
    hist, counters = server.get("histograms", {}), server.get("counters", {})
    out: dict[str, float] = {}
    for key, name in (("ttft", NPU_FIGURES[0][1]), ("itl", NPU_FIGURES[1][1]),
                      ("step", NPU_FIGURES[2][1])):
        if name in hist:
            out[f"mean_{key}_ms"] = hist[name]["mean"] * 1000.0
            out[f"p99_{key}_ms"] = hist[name]["p99"] * 1000.0
    step = hist.get("xyserve:npu_step_seconds")
    generated = counters.get("xyserve:generation_tokens_total")
    if step and step["sum"] > 0:
        out["num_steps"] = step["count"]
        out["busy_s"] = step["sum"]
        if generated:
            # as if the NPU had run the same steps back to back
            out["output_throughput"] = generated / step["sum"]
    return out
