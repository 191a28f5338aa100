"""A sweep's description (SWEEP.yaml) and its points.

    workload:                      # one trace for every point
      trace: AzureLLMInferenceTrace_conv.csv   # Azure CSV or ShareGPT-style JSON (relative to
                                               # this file); or `synthetic: {num_requests: 500,
                                               # input_len: "1000", output_len: "200"}`
      start: 1500                  # a window of the trace: from 1500 s in (scaled) ...
      duration: 600                # ... for 600 s
    slo: {ttft: 2, tpot: 0.1}      # seconds (the CLI's --slo wins)
    base: {max_model_len: 16384}   # options every point shares
    grid:                          # the cartesian product of these lists ...
      model: [llama-3-70b, qwen2.5-72b]
      request_rate: [4, 6]
    points:                        # ... times each of these (either alone: just it)
      - {tensor_parallel_size: 4, replicas: 2}
      - {tensor_parallel_size: 4, prefill_replicas: 2, decode_replicas: 2}

Every point is one `simulate` run (cluster.sweep_run). Its options are POINT_OPTIONS; a value of
the wrong type or an unknown name is an error naming it, before anything runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.results import Slo
from cluster.workload import WorkloadError

# name -> type of every option a point may set (engine options keep `simulate`'s flag names)
POINT_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "model": str, "npu": str, "tensor_parallel_size": int, "replicas": int,
    "prefill_replicas": int, "decode_replicas": int, "router": str, "kv_link": str,
    "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int,
    "mixed_prefill_budget": (int, type(None)),
    "block_size": int, "num_kv_blocks": int, "enable_prefix_caching": bool,
    "scheduling_policy": str, "stack": str, "npu_dtype": str, "speculative": (str, type(None)),
    "num_speculative_tokens": int, "acceptance_rate": (int, float),
    "kv_reserve_fraction": (int, float), "seed": int,
    # the workload at this point: arrivals scaled to request_rate (a trace: its mean rate over
    # the whole trace becomes this; drawn arrivals: drawn at it), or by time_scale
    "request_rate": (int, float), "time_scale": (int, float), "start": (int, float),
    "duration": (int, float),
    "num_requests": int, "long_requests": str,
}
WORKLOAD_KEYS = ("trace", "synthetic", "start", "duration", "time_scale", "num_requests",
                 "request_rate", "long_requests", "seed")
SYNTHETIC_KEYS = ("num_requests", "input_len", "output_len", "arrivals", "burstiness")
DEFAULT_MODEL = "llama-2-7b"


class SweepError(ValueError):
    """A sweep file that cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True)
class WorkloadSource:
    """The one trace (or synthetic draw) every point replays."""

    trace: str | None  # absolute path of an Azure CSV or ShareGPT-style JSON
    synthetic: Mapping[str, Any] | None  # synthetic(...)'s arguments (SYNTHETIC_KEYS)
    defaults: Mapping[str, Any]  # point options given under `workload` (duration, ...)

    @property
    def name(self) -> str:
        return Path(self.trace).name if self.trace else "synthetic"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep: the workload, the SLO, the points."""

    workload: WorkloadSource
    slo: Slo | None
    points: tuple[dict[str, Any], ...]  # each: every option the point sets, base included


def point_id(point: Mapping[str, Any], workload: WorkloadSource) -> str:
    """A stable id of a point on a workload: what --resume matches on."""
    text = json.dumps({"point": dict(point), "trace": workload.name,
                       "synthetic": dict(workload.synthetic or {})}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check SWEEP.yaml (module docstring); raises SweepError naming what is wrong."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep is a mapping with workload, grid and/or points")
    unknown = set(data) - {"workload", "slo", "base", "grid", "points"}
    if unknown:
        raise SweepError(f"{path}: unknown key {sorted(unknown)[0]!r} (workload, slo, base, "
                         f"grid, points)")
    workload = _workload(path, data.get("workload"))
    slo = _slo(path, data.get("slo"))
    base = _options(path, "base", data.get("base") or {})
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{path}: grid maps each option to a non-empty list of values")
    listed = data.get("points") or []
    if not isinstance(listed, list) or not all(isinstance(p, dict | None) for p in listed):
        raise SweepError(f"{path}: points is a list of mappings")
    if not grid and not listed:
        raise SweepError(f"{path}: no points (give a grid or points)")
    names = list(grid)
    points: list[dict[str, Any]] = []
    for values in itertools.product(*(grid[n] for n in names)):
        combo = dict(zip(names, values, strict=True))
        for i, point in enumerate(listed or [{}]):
            where = f"points[{i}]" if listed else "grid"
            points.append(_options(path, where, {**base, **combo, **(point or {})}))
    full = [{"model": DEFAULT_MODEL, **workload.defaults, **p} for p in points]
    return SweepSpec(workload, slo, tuple(full))


def _options(path: Path, where: str, options: Any) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise SweepError(f"{path}: {where} must be a mapping of options")
    for name, value in options.items():
        want = POINT_OPTIONS.get(name)
        if want is None:
            raise SweepError(f"{path}: {where}: unknown option {name!r} (known: "
                             f"{', '.join(POINT_OPTIONS)})")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise SweepError(f"{path}: {where}: {name} must be {_type_name(want)}, got "
                             f"{value!r}")
    return dict(options)


def _type_name(want: type | tuple[type, ...]) -> str:
    names = [t.__name__ for t in (want if isinstance(want, tuple) else (want,))]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def _workload(path: Path, data: Any) -> WorkloadSource:
    if not isinstance(data, dict) or ("trace" in data) == ("synthetic" in data):
        raise SweepError(f"{path}: workload needs exactly one of trace: FILE or synthetic: "
                         f"{{...}}")
    unknown = set(data) - set(WORKLOAD_KEYS)
    if unknown:
        raise SweepError(f"{path}: workload: unknown key {sorted(unknown)[0]!r}")
    defaults = _options(path, "workload", {k: v for k, v in data.items()
                                           if k not in ("trace", "synthetic")})
    if "trace" in data:
        trace = path.parent / str(data["trace"])
        if not trace.is_file():
            raise SweepError(f"{path}: workload: no trace file {trace}")
        return WorkloadSource(str(trace.resolve()), None, defaults)
    synthetic = data["synthetic"]
    if not isinstance(synthetic, dict) or set(synthetic) - set(SYNTHETIC_KEYS):
        raise SweepError(f"{path}: workload: synthetic takes {', '.join(SYNTHETIC_KEYS)}")
    return WorkloadSource(None, dict(synthetic), defaults)


def _slo(path: Path, data: Any) -> Slo | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) - {"ttft", "tpot"}:
        raise SweepError(f"{path}: slo is {{ttft: SECONDS, tpot: SECONDS}}")
    try:
        return Slo.parse(",".join(f"{k}={v}" for k, v in data.items()))
    except ValueError as exc:
        raise SweepError(f"{path}: {exc}") from None


def check_workload_loadable(spec: SweepSpec) -> None:
    """Read the trace once up front, so that a bad file is one error, not one per point."""
    from cluster.sweep_run import load_base_workload

    try:
        load_base_workload(spec.workload)
    except WorkloadError as exc:
        raise SweepError(str(exc)) from None
