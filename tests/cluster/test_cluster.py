"""Replicas on one simulated clock: one replica is `simulate` exactly; N identical replicas under
round-robin at N times the rate are N copies of one replica. Timing only, no torch."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.cluster_sim import ClusterConfig, ClusterSimulation
from cluster.results import summarize
from cluster.simulation import Simulation
from cluster.workload import RequestSpec, Workload, synthetic

MODEL = "llama-2-7b"
OPTIONS = dict(max_num_batched_tokens=1024, max_num_seqs=32)


def per_request(result: Any) -> list[tuple[float, ...]]:
    return [(r.queue_s, r.ttft_s, r.e2e_s, r.num_output_tokens)
            for r in sorted(result.recorder.requests.values(), key=lambda r: r.index)]


def flat(rows: list[tuple[float, ...]]) -> list[float]:
    return [x for row in rows for x in row]


def test_one_replica_is_simulate_exactly() -> None:
    workload = synthetic(60, 6.0, "lognormal:mean=700,sigma=0.7", "lognormal:mean=80,sigma=0.7",
                         seed=3)
    single = Simulation(MODEL, **OPTIONS).run(workload)
    cluster = ClusterSimulation(MODEL, ClusterConfig(), **OPTIONS).run(workload)
    assert cluster.recorder.steps == single.recorder.steps
    assert per_request(cluster) == per_request(single)
    assert cluster.summary.ttft_s == single.summary.ttft_s
    assert (cluster.summary.num_replicas, cluster.summary.num_npus) == (1, 1)
    # its engine's own summary: what summarize makes of its recorder (taken from the cluster's)
    (own,) = cluster.replica_summaries
    s = cluster.summary
    assert own == summarize(cluster.replicas[0].recorder, chip=own.chip, num_rejected=0,
                            model=s.model, workload=s.workload, stack=s.stack,
                            lowering=s.lowering, scheduling=s.scheduling)
    assert own.chip.startswith(cluster.replicas[0].name)


def test_n_replicas_round_robin_at_n_times_the_rate_give_one_replicas_latencies() -> None:
    # One replica's stream: a request every 0.25 s, lengths varying. The cluster's stream at
    # N x the rate interleaves N time-shifted copies of it, so that round robin hands replica k
    # exactly the one-replica stream shifted by k / (N x rate).
    n, gap_s = 3, 0.25
    base = [RequestSpec(gap_s * j, 300 + 97 * (j % 7), 20 + 13 * (j % 5)) for j in range(40)]
    single = Simulation(MODEL, **OPTIONS).run(Workload(tuple(base), "one"))
    merged = tuple(RequestSpec(r.arrival_s + k * gap_s / n, r.prompt_len, r.output_len)
                   for r in base for k in range(n))
    cluster = ClusterSimulation(MODEL, ClusterConfig(n), **OPTIONS).run(
        Workload(merged, f"{n}x"))
    expected = per_request(single)
    got = per_request(cluster)
    for k in range(n):
        assert flat(got[k::n]) == pytest.approx(flat(expected), rel=1e-9, abs=1e-12)
    # the same values three times over: equal means, percentiles up to their interpolation
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        ours, theirs = getattr(cluster.summary, name), getattr(single.summary, name)
        assert ours["mean"] == pytest.approx(theirs["mean"], rel=1e-9)
        assert ours == pytest.approx(theirs, rel=2e-2)
    assert cluster.summary.request_throughput == pytest.approx(
        n * single.summary.request_throughput, rel=0.02)
    assert cluster.summary.num_npus == n
    assert [s.num_requests for s in cluster.replica_summaries] == [40] * n


def test_poisson_at_n_times_the_rate_is_close_to_one_replica() -> None:
    rate, n = 2.0, 2
    draw = dict(input_len="lognormal:mean=600,sigma=0.5", output_len="30", seed=5)
    single = Simulation(MODEL, **OPTIONS).run(synthetic(80, rate, **draw)).summary
    cluster = ClusterSimulation(MODEL, ClusterConfig(n), **OPTIONS).run(
        synthetic(160, n * rate, **draw)).summary
    assert cluster.tpot_s["p50"] == pytest.approx(single.tpot_s["p50"], rel=0.15)
    assert cluster.ttft_s["p50"] == pytest.approx(single.ttft_s["p50"], rel=0.25)


def test_more_replicas_cut_queueing_under_load() -> None:
    workload = synthetic(60, 12.0, "1500", "40", seed=2)
    one = ClusterSimulation(MODEL, ClusterConfig(1), **OPTIONS).run(workload).summary
    four = ClusterSimulation(MODEL, ClusterConfig(4), **OPTIONS).run(workload).summary
    assert four.ttft_s["p99"] < one.ttft_s["p99"] / 3
    assert four.num_npus == 4 and four.num_requests == one.num_requests == 60
    assert 0 < sum(four.npu_utilization.values()) < 1  # per replica, not summed


@pytest.mark.parametrize("bad", [dict(num_replicas=0), dict(num_prefill_replicas=2),
                                 dict(num_decode_replicas=1), dict(kv_link="pcie")])
def test_cluster_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClusterConfig(**bad)  # type: ignore[arg-type]
