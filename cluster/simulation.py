"""The Python API of `xyserve simulate`: one model on one simulated NPU, a workload through the
timing-only engine, results on the simulated clock.

    from cluster import Simulation, synthetic
    sim = Simulation("llama-2-7b", npu="910b2", max_num_batched_tokens=2048)
    result = sim.run(synthetic(200, rate=4.0, input_len="512", output_len="128"))
    print(result.summary.ttft_s["p99"], result.summary.output_throughput)

Engine options are EngineConfig's (the same names `serve` takes); `acceptance_rate` models
speculative decoding's drafts (there are no real tokens to verify).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cluster.driver import RejectedRequest, drive
from cluster.recorder import Recorder
from cluster.results import Slo, Summary, summarize, write_csvs, write_json
from cluster.workload import Workload
from engine.arch_presets import resolve_arch
from engine.config import EngineConfig
from engine.lowering import DEFAULT_POLICY, LoweringPolicy
from engine.timing_runner import (
    DEFAULT_KV_RESERVE_FRACTION,
    build_timing_engine,
    policy_name,
)


@dataclass(frozen=True)
class SimulationResult:
    """What one simulation produced."""

    summary: Summary  # the numbers (summary.json)
    recorder: Recorder  # every step and request, for CSVs and plots
    rejected: tuple[RejectedRequest, ...]  # requests the engine could never serve

    def write(self, out_dir: str | Path, plots: bool = True) -> list[Path]:
        """summary.json, requests.csv, steps.csv (and the plots) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [write_json(self.summary, out / "summary.json",
                            {"rejected": [r.__dict__ for r in self.rejected]}),
                 *write_csvs(self.recorder, out)]
        if plots:
            from cluster.plots import write_plots

            paths += write_plots(self.recorder, out,
                                 f"{self.summary.model} on {self.summary.chip}: "
                                 f"{self.summary.workload}")
        return paths


def chip_label(chip: str, tp: int) -> str:
    """The summary's name of the NPUs one engine runs on: the chip, or its TP group."""
    return chip if tp == 1 else f"{tp} x {chip} (TP {tp})"


def run_labels(config: EngineConfig, lowering: LoweringPolicy) -> dict[str, str]:
    """The summary's names of a run's serving stack, lowering and scheduling policy."""
    return {"stack": config.npu_stack, "lowering": policy_name(lowering),
            "scheduling": config.scheduler.policy}


class Simulation:
    """A model on a simulated chip with the engine's options, ready to run workloads."""

    def __init__(self, model: str, *, config: EngineConfig | None = None,
                 acceptance_rate: float = 0.7,
                 kv_reserve_fraction: float = DEFAULT_KV_RESERVE_FRACTION,
                 tensor_parallel_size: int = 1, lowering: LoweringPolicy = DEFAULT_POLICY,
                 **engine_options: Any) -> None:
        """model: an arch preset or a Hugging Face config.json (file or directory). Engine
        options: a whole `config` (its model is replaced), or EngineConfig.from_kwargs names.
        lowering: how steps are lowered (engine.lowering: XY-Serve's virtual padding and
        meta-kernel by default, BASELINE_POLICY for bucket padding and split attention; the
        scheduler's `policy` is an engine option).
        Raises ModelLoadError / ValueError for a model, chip or option it cannot simulate."""
        self.model = model
        self.arch = resolve_arch(model)
        self.config = (replace(config, model=model) if config is not None
                       else EngineConfig.from_kwargs(model=model, **engine_options))
        self.acceptance_rate = acceptance_rate
        self.kv_reserve_fraction = kv_reserve_fraction
        self.tensor_parallel_size = tensor_parallel_size
        self.lowering = lowering
        self.engine = self._build()  # built here so that bad options fail at once

    def _build(self) -> Any:
        return build_timing_engine(self.config, self.arch, self.model, self.acceptance_rate,
                                   self.kv_reserve_fraction, self.tensor_parallel_size,
                                   self.lowering)

    def run(self, workload: Workload, slo: Slo | None = None,
            on_step: Callable[[float], None] | None = None) -> SimulationResult:
        """Run `workload` to its end on a fresh engine (the first run uses the one built)."""
        engine, self.engine = self.engine or self._build(), None
        recorder = Recorder()
        rejected = drive(engine, workload, recorder, on_step)
        tp = self.tensor_parallel_size
        summary = summarize(recorder, model=self.model, chip=chip_label(engine.info.chip, tp),
                            workload=workload.source, num_rejected=len(rejected),
                            num_dropped=workload.num_dropped, num_clipped=workload.num_clipped,
                            slo=slo, num_npus=tp, **run_labels(self.config, self.lowering))
        return SimulationResult(summary, recorder, tuple(rejected))
