"""server.histograms.StepHistogram exposes what prometheus_client's Histogram does for the same
observations, taken one at a time or a step at once."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

import server.metrics  # noqa: F401  (its process-wide switch: no *_created series)
from server.histograms import StepHistogram

BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.5)


def expositions(values: list[float], batch: int) -> tuple[bytes, bytes]:
    """The text of a prometheus_client Histogram fed `values` one by one, and of a
    StepHistogram fed them `batch` at a time."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("xyserve:itl_seconds", "Seconds between tokens.", ("model_name",),
                          registry=theirs, buckets=BUCKETS).labels("m")
    histogram = StepHistogram("xyserve:itl_seconds", "Seconds between tokens.", ("model_name",),
                              ("m",), BUCKETS, registry=ours)
    for value in values:
        reference.observe(value)
    for i in range(0, len(values), batch):
        histogram.observe_many(values[i:i + batch])
    return generate_latest(ours), generate_latest(theirs)


@pytest.mark.parametrize("batch", [1, 16, 1000])
def test_the_exposition_is_prometheus_clients(batch: int) -> None:
    rng = random.Random(3)
    # every bucket, the bounds themselves (le is inclusive), beyond the last, and zero
    values = [*BUCKETS, 0.0, 3.0, 1e9] + [rng.expovariate(20.0) for _ in range(500)]
    ours, theirs = expositions(values, batch)
    assert ours == theirs
    assert b'xyserve:itl_seconds_bucket{le="0.01",model_name="m"}' in ours


def test_nothing_observed_is_all_zeros() -> None:
    ours, theirs = expositions([], 1)
    assert ours == theirs
    assert b'xyserve:itl_seconds_count{model_name="m"} 0.0' in ours


def test_observations_from_threads_are_all_counted() -> None:
    registry = CollectorRegistry()
    histogram = StepHistogram("h", "h", (), (), BUCKETS, registry=registry)

    def feed() -> None:
        for _ in range(2000):
            histogram.observe_many([0.002] * 16)

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.get_sample_value("h_count") == 4 * 2000 * 16
    assert registry.get_sample_value("h_bucket", {"le": "0.001"}) == 0
    assert registry.get_sample_value("h_bucket", {"le": "0.005"}) == 4 * 2000 * 16


def test_buckets_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="increasing"):
        StepHistogram("h", "h", (), (), (0.1, 0.01), registry=CollectorRegistry())
