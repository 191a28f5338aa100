"""StepHistogram: one Prometheus histogram series that takes a step's observations at once.

The engine's stats arrive once a step with a value per running request (16 inter-token latencies
on each clock at 16 streams) and are recorded on the thread that hands the step's tokens to the
event loop. prometheus_client's Histogram.observe takes ~1.7 us a value (two locked increments
and a linear search of the buckets): a step's ~36 values cost ~30 us, several times that with
the engine's kernels on both cores. Here a step's values for one series take one lock, and each
a bisection. The exposition is what prometheus_client writes for a Histogram with the same name,
labels and buckets (tests/server/test_histograms.py holds the two equal).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class StepHistogram(Collector):
    """A histogram with one series (fixed label values), registered in `registry`.

    Args:
        name: the family name (without `_bucket` / `_sum` / `_count`).
        documentation: its help text.
        labelnames, labelvalues: the series' labels, in order.
        buckets: the upper bounds, increasing (+Inf is added).
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 labelvalues: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in increasing order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._name, self._documentation = name, documentation
        self._labelnames, self._labelvalues = list(labelnames), list(labelvalues)
        self._bounds = bounds
        self._le = [floatToGoString(b) for b in bounds]
        self._counts = [0] * len(bounds)  # observations per bucket (not cumulative)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        """Observe each of `values` (an empty iterable observes nothing)."""
        bounds, counts = self._bounds, self._counts
        with self._lock:
            for value in values:
                counts[bisect.bisect_left(bounds, value)] += 1  # the first bound >= value
                self._sum += value

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self._name, self._documentation,
                                       labels=self._labelnames)
        cumulative, buckets = 0, []
        for le, count in zip(self._le, counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric(self._labelvalues, buckets, total)
        yield family
