"""Head templates built ahead by a forked worker (engine.head_prefetch): a run whose token counts
adopt them takes the same steps, the same simulated times bit for bit, as a run that builds
every head itself; a worker that sends nothing (stopped, or not yet there) changes nothing."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest

from cluster.cluster_sim import ClusterSimulation
from cluster.recorder import Recorder
from cluster.workload import synthetic
from engine import timing_runner
from engine.config import SchedulerConfig
from engine.cpus import cgroup_cpu_quota
from engine.head_prefetch import head_counts
from engine.timing_runner import TimingRunner
from server.cli import main

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the worker is forked")

OPTIONS = dict(max_num_batched_tokens=192, max_num_seqs=24)


def _run(prefetch: str) -> tuple[Recorder, TimingRunner]:
    """A mixed load (prompts chunked among decodes, preemption-free) through one engine; the
    worker, for `prefetch` "done", has built every count's head before the first step."""
    sim = ClusterSimulation("llama-3-8b", **OPTIONS)
    core = sim._engine
    assert core is not None
    runner = core.runner
    assert isinstance(runner, TimingRunner)
    if prefetch != "none":
        runner.prefetch_heads(head_counts(sim.config.scheduler))
        if prefetch == "done":
            assert runner._prefetch is not None
            runner._prefetch.join(timeout_s=120)
        else:  # "stopped": nothing it sent is taken
            runner.stop_prefetch()
    workload = synthetic(60, 40.0, "lognormal:mean=300,sigma=0.8", "lognormal:mean=40,sigma=0.6",
                         seed=3)
    from cluster.driver import drive

    recorder = Recorder()
    assert not drive(core, workload, recorder)
    runner.stop_prefetch()
    return recorder, runner


def test_the_counts_come_decode_batches_first_then_capped_chunks_then_the_rest() -> None:
    counts = head_counts(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    # the cap is half the budget: 32 prompt tokens beside up to 8 decodes
    assert counts == [*range(1, 9), *range(33, 41), *range(9, 33), *range(41, 65)]
    assert sorted(head_counts(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=64))) \
        == list(range(1, 17))  # (more sequences than the budget: every count once)


@pytest.mark.parametrize("prefetch", ["done", "stopped"])
def test_adopted_heads_time_steps_as_the_heads_built_here(prefetch: str) -> None:
    built, local = _run("none")
    adopted, runner = _run(prefetch)
    assert local.num_adopted_heads == 0
    if prefetch == "done":  # every new token count whose rows' tail was known took one
        assert runner.num_adopted_heads >= 20, runner.num_adopted_heads
    else:
        assert runner.num_adopted_heads == 0
    assert adopted.steps == built.steps  # the same steps, at the same simulated times
    assert adopted.requests == built.requests
    assert adopted.kernel_s == built.kernel_s and adopted.device_s == built.device_s
    assert runner.device.num_launches == local.device.num_launches
    assert runner.device.num_tasks == local.device.num_tasks


def test_the_simulation_stops_its_worker_and_runs_without_one_for_several_engines() -> None:
    sim = ClusterSimulation("llama-3-8b", prefetch_heads=True, **OPTIONS)
    result = sim.run(synthetic(20, 20.0, "200", "10", seed=1))
    assert result.summary.num_requests == 20
    runner = result.replicas[0].core.runner
    assert isinstance(runner, TimingRunner) and runner._prefetch is None  # stopped at the end


def test_a_cgroup_quota_under_two_cpus_leaves_no_core_free(tmp_path: pathlib.Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None  # (no file: no quota known)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1, no quota
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_quota(tmp_path) == 4.0


@pytest.mark.parametrize("flag,workers", [("--prefetch-heads", 1), ("--no-prefetch-heads", 0)])
def test_the_cli_forks_a_worker_unless_told_not_to(flag: str, workers: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    started = []

    class Counted(timing_runner.HeadPrefetcher):
        def __init__(self, *args: Any) -> None:
            started.append(self)
            super().__init__(*args)

    monkeypatch.setattr(timing_runner, "HeadPrefetcher", Counted)
    assert main(["simulate", "--synthetic", "--num-requests", "10", "--input-len", "100",
                 "--output-len", "4", "--no-progress", flag]) == 0
    assert len(started) == workers
