"""The Python API of a simulated cluster: replicas of one model behind a router, or prefill and
decode replicas (P/D disaggregation), on one simulated clock.

    from cluster.cluster_sim import ClusterConfig, ClusterSimulation
    from cluster.routing import RouterConfig
    from cluster.workload import synthetic
    sim = ClusterSimulation("llama-3-70b", ClusterConfig(num_replicas=4,
                            router=RouterConfig("least-loaded")), tensor_parallel_size=4)
    result = sim.run(synthetic(2000, rate=12.0, input_len="1000", output_len="200"))
    result.summary            # the cluster as its clients see it
    result.replica_summaries  # each engine as it saw its own requests

Every replica is the serving engine over the timing-only runner (cluster.simulation), so one
replica without disaggregation gives exactly what `Simulation` gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.cluster_driver import ClusterDriver, ClusterRun
from cluster.disagg import (
    TRANSFER_COLUMNS,
    KvLink,
    KvTransferModel,
    compose,
    kv_bytes_per_token,
    resolve_link,
)
from cluster.driver import RejectedRequest
from cluster.recorder import Recorder
from cluster.replica import Replica, Role
from cluster.results import Slo, Summary, summarize, write_csvs, write_json
from cluster.routing import Router, RouterConfig
from cluster.simulation import chip_label, run_labels
from cluster.workload import Workload
from engine.arch_presets import resolve_arch
from engine.config import EngineConfig, SpeculativeConfig
from engine.core import EngineCore
from engine.cpus import second_core_free
from engine.head_prefetch import head_counts
from engine.lowering import DEFAULT_POLICY, LoweringPolicy
from engine.timing_runner import (
    DEFAULT_KV_RESERVE_FRACTION,
    TimingRunner,
    build_timing_engine,
)
from npu_sim.hardware import load_chip


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster's shape: how many engines of which role, and how arrivals are routed."""

    num_replicas: int = 1  # engines that prefill and decode (each a TP group); ignored with P/D
    num_prefill_replicas: int = 0  # P/D disaggregation: prefill-only engines (0 = none) ...
    num_decode_replicas: int = 0  # ... and decode(+verify) engines; both or neither
    router: RouterConfig = field(default_factory=RouterConfig)  # over mixed / prefill replicas
    kv_link: KvLink = "auto"  # P/D: hccs (one node), roce (across nodes); auto: hccs when all
    #   the cluster's NPUs fit one node's HCCS mesh

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.num_replicas}")
        if (self.num_prefill_replicas > 0) != (self.num_decode_replicas > 0) or min(
                self.num_prefill_replicas, self.num_decode_replicas) < 0:
            raise ValueError("P/D disaggregation needs at least one prefill replica and one "
                             f"decode replica, got {self.num_prefill_replicas} and "
                             f"{self.num_decode_replicas}")
        if self.kv_link not in ("auto", "hccs", "roce"):
            raise ValueError(f"kv link must be auto, hccs or roce, got {self.kv_link!r}")

    @property
    def disaggregated(self) -> bool:
        return self.num_prefill_replicas > 0

    @property
    def roles(self) -> tuple[Role, ...]:
        """Each engine's role, in replica order."""
        if self.disaggregated:
            return (("prefill",) * self.num_prefill_replicas
                    + ("decode",) * self.num_decode_replicas)
        return ("mixed",) * self.num_replicas

    def describe(self) -> str:
        """`2P + 3D (kv over auto)` or `4 replicas (least-loaded)`; empty for one replica."""
        if self.disaggregated:
            return (f"{self.num_prefill_replicas}P + {self.num_decode_replicas}D (kv over "
                    f"{self.kv_link})")
        if self.num_replicas == 1:
            return ""
        return f"{self.num_replicas} replicas ({self.router.policy})"


@dataclass(frozen=True)
class ClusterResult:
    """What one cluster simulation produced."""

    summary: Summary  # the cluster, requests as their clients saw them
    replica_summaries: tuple[Summary, ...]  # each engine as it saw its own requests
    replicas: tuple[Replica, ...]  # their engines and recorders
    recorder: Recorder  # the merged one behind `summary`
    run: ClusterRun  # rejected requests, P/D transfers, wall time

    @property
    def rejected(self) -> tuple[RejectedRequest, ...]:
        return tuple(self.run.rejected)

    def write(self, out_dir: str | Path, plots: bool = True) -> list[Path]:
        """summary.json (cluster, replicas), requests.csv, steps.csv (all replicas), kv
        transfers with P/D, and the plots, into out_dir."""
        import csv

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        replicas = [{"replica": r.name, **asdict(s)}
                    for r, s in zip(self.replicas, self.replica_summaries, strict=True)]
        paths = [write_json(self.summary, out / "summary.json",
                            {"replicas": replicas,
                             "rejected": [r.__dict__ for r in self.run.rejected]}),
                 *write_csvs(self.recorder, out)]
        if self.run.transfers:
            path = out / "kv_transfers.csv"
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(TRANSFER_COLUMNS)
                for t in sorted(self.run.transfers.values(), key=lambda t: t.index):
                    w.writerow([getattr(t, c) for c in TRANSFER_COLUMNS])
            paths.append(path)
        if plots:
            from cluster.plots import write_plots

            paths += write_plots(self.recorder, out, f"{self.summary.model} on "
                                                     f"{self.summary.chip}: "
                                                     f"{self.summary.workload}")
        return paths


class ClusterSimulation:
    """A model on a cluster of simulated engines, ready to run workloads."""

    def __init__(self, model: str, cluster: ClusterConfig | None = None, *,
                 config: EngineConfig | None = None, acceptance_rate: float = 0.7,
                 kv_reserve_fraction: float = DEFAULT_KV_RESERVE_FRACTION,
                 tensor_parallel_size: int = 1, lowering: LoweringPolicy = DEFAULT_POLICY,
                 prefetch_heads: bool | None = False, **engine_options: Any) -> None:
        """As cluster.simulation.Simulation, plus the cluster's shape. prefetch_heads: a
        cluster of one engine has a forked worker build its steps' head templates on another
        core (engine.head_prefetch; the same results); None: where a second core is free
        (engine.cpus.second_core_free, what `xyserve simulate` does). Raises
        ValueError (or ModelLoadError) for anything it cannot simulate, before running."""
        self.model = model
        self.prefetch_heads = second_core_free() if prefetch_heads is None else prefetch_heads
        self.cluster = cluster or ClusterConfig()
        self.arch = resolve_arch(model)
        self.config = (replace(config, model=model) if config is not None
                       else EngineConfig.from_kwargs(model=model, **engine_options))
        self.acceptance_rate = acceptance_rate
        self.kv_reserve_fraction = kv_reserve_fraction
        self.tp = tensor_parallel_size
        self.lowering = lowering
        self.chip = load_chip(self.config.npu)
        self.num_npus = len(self.cluster.roles) * self.tp
        self.kv_transfer = None
        if self.cluster.disaggregated:
            link = resolve_link(self.cluster.kv_link, self.num_npus, self.chip)
            self.kv_transfer = KvTransferModel(link, kv_bytes_per_token(self.arch), self.tp,
                                               self.chip)
        # built here so that a bad model, chip or option fails at once (and the first run uses it)
        self._engine: EngineCore | None = self._build("mixed")
        self.max_model_len = self._engine.info.max_model_len  # resolved

    def _build(self, role: Role) -> EngineCore:
        config = self.config
        if role == "prefill":  # one token per request: drafts would never be verified
            config = replace(config, speculative_config=SpeculativeConfig())
        return build_timing_engine(config, self.arch, self.model, self.acceptance_rate,
                                   self.kv_reserve_fraction, self.tp, self.lowering)

    def run(self, workload: Workload, slo: Slo | None = None,
            on_step: Callable[[float], None] | None = None) -> ClusterResult:
        """Run `workload` to its end on fresh engines."""
        replicas = []
        for index, role in enumerate(self.cluster.roles):
            if role == "mixed" and self._engine is not None:  # the one built to check options
                engine, self._engine = self._engine, None
            else:
                engine = self._build(role)
            replicas.append(Replica(index, role, engine, self.tp))
        driver = ClusterDriver(replicas, Router(self.cluster.router), self.kv_transfer)
        # (one engine only: a worker per engine would want a core each)
        runner = replicas[0].core.runner if self.prefetch_heads and len(replicas) == 1 else None
        if isinstance(runner, TimingRunner):
            runner.prefetch_heads(head_counts(self.config.scheduler))
        try:
            run = driver.run(workload, on_step)
        finally:
            if isinstance(runner, TimingRunner):
                runner.stop_prefetch()
        recorder = merge(replicas, run)
        chip = chip_label(replicas[0].core.info.chip, self.tp)
        common = dict(model=self.model, workload=workload.source, slo=slo,
                      **run_labels(self.config, self.lowering))
        shape = self.cluster.describe()
        summary = summarize(recorder, chip=f"{shape} of {chip}" if shape else chip,
                            num_rejected=len(run.rejected), num_dropped=workload.num_dropped,
                            num_clipped=workload.num_clipped, num_replicas=len(replicas),
                            num_npus=self.num_npus, **common)  # type: ignore[arg-type]
        if len(replicas) == 1:  # its engine saw every request the cluster did: the same
            #   numbers under its own name (summarize's arguments below; a long trace's
            #   summary is ~0.1 s of percentiles)
            per_replica: tuple[Summary, ...] = (replace(
                summary, chip=f"{replicas[0].name}: {chip}", num_rejected=0, num_dropped=0,
                num_clipped=0, num_replicas=1, num_npus=self.tp),)
        else:
            per_replica = tuple(summarize(r.recorder, chip=f"{r.name}: {chip}", num_rejected=0,
                                          num_npus=self.tp, **common)  # type: ignore[arg-type]
                                for r in replicas)
        return ClusterResult(summary, per_replica, tuple(replicas), recorder, run)


def merge(replicas: list[Replica], run: ClusterRun) -> Recorder:
    """One recorder for the cluster: every replica's steps and NPU time, and every request as
    its client saw it (a P/D request's prefill and decode halves composed): one replica's
    own."""
    if len(replicas) == 1:
        return replicas[0].recorder
    merged = Recorder()
    decode_records = {}
    for replica in replicas:
        rec = replica.recorder
        merged.steps.extend(rec.steps)
        merged.itls_s.extend(rec.itls_s)
        merged.kernel_s.update(rec.kernel_s)
        merged.device_s += rec.device_s
        merged.host_s += rec.host_s
        merged.max_kv_usage = max(merged.max_kv_usage, rec.max_kv_usage)
        merged.num_preemptions += rec.num_preemptions
        merged.wall_s = rec.wall_s
        if replica.role == "decode":
            decode_records.update(rec.requests)
        else:
            merged.requests.update(rec.requests)
    for index, record in list(merged.requests.items()):
        record, gap_s = compose(record, decode_records.get(index), run.transfers.get(index))
        merged.requests[index] = record
        if gap_s is not None:
            merged.itls_s.append(gap_s)
    return merged
