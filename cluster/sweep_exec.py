"""Running a sweep's points: as Ray tasks (a local Ray started with as many CPUs as this machine
has, or an existing cluster by address), or one after another in this process when Ray is not
installed. Rows stream into one CSV as points finish; `resume` skips the points the CSV already
holds as finished; the JSON beside it is written at the end, all rows in point order.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.sweep_run import METRIC_COLUMNS, load_base_workload, run_point
from cluster.sweep_spec import POINT_OPTIONS, SweepSpec, point_id


@dataclass(frozen=True)
class ExecOptions:
    """How the points run."""

    use_ray: bool = True  # False: in this process, one after another
    ray_address: str | None = None  # an existing Ray cluster; None: start one on this machine
    num_workers: int | None = None  # local Ray's CPUs (one point each); None: all cores
    resume: bool = False  # skip points the output already holds with status ok
    progress: bool = False  # a tqdm bar over the points


def columns(spec: SweepSpec) -> list[str]:
    """The table's columns: id, status, error, the options any point sets, the metrics."""
    used = {k for p in spec.points for k in p}
    return ["point_id", "status", "error", *[k for k in POINT_OPTIONS if k in used],
            *METRIC_COLUMNS]


def run_sweep(spec: SweepSpec, out_csv: Path, options: ExecOptions,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[dict]:
    """Run every point not already done; returns all rows (resumed ones included) in point
    order. Raises ValueError when --resume meets a CSV of other columns."""
    header = columns(spec)
    done = _read_done(out_csv, header) if options.resume else {}
    ids = [point_id(p, spec.workload) for p in spec.points]
    todo = [(i, p) for i, p in enumerate(spec.points) if ids[i] not in done]
    if done:
        log(f"resuming: {len(spec.points) - len(todo)} of {len(spec.points)} points already in "
            f"{out_csv}")
    rows: dict[str, dict] = dict(done)
    append = bool(done) and out_csv.is_file()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, header, extrasaction="ignore")
        if not append:
            writer.writeheader()
        bar = _bar(len(todo), options.progress)
        for row in _execute(spec, todo, options, log):
            rows[row["point_id"]] = row
            writer.writerow(row)
            f.flush()  # the table grows as points finish
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{row['status']}: {_label(row)}", refresh=False)
            if row["status"] != "ok":
                log(f"point {row['point_id']} ({_label(row)}) failed: {row['error']}")
        if bar is not None:
            bar.close()
    ordered = [rows[i] for i in ids if i in rows]
    out_csv.with_suffix(".json").write_text(json.dumps(ordered, indent=1, default=str))
    return ordered


def _execute(spec: SweepSpec, todo: Sequence[tuple[int, dict]], options: ExecOptions,
             log: Callable[[str], None]) -> Iterator[dict]:
    if not todo:
        return
    base = load_base_workload(spec.workload)
    ray = _import_ray() if options.use_ray else None
    if ray is None:
        if options.use_ray:
            log(f"ray is not installed: running the {len(todo)} points one after another in "
                f"this process (pip install 'xyserve[cluster]' to fan them out)")
        for _, point in todo:
            yield run_point(point, spec.workload, base, spec.slo)
        return
    started = _init_ray(ray, options, log)
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(run_point)
        base_ref, slo = ray.put(base), spec.slo
        pending = {task.remote(p, spec.workload, base_ref, slo): p for _, p in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                point = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as exc:  # the worker died (memory, signal): the point failed
                    yield {"point_id": point_id(point, spec.workload), "status": "error",
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                           **point}
    finally:
        if started:
            ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        return None
    return ray


def _init_ray(ray: Any, options: ExecOptions, log: Callable[[str], None]) -> bool:
    """Connect to options.ray_address, or start Ray on this machine; True if we started it."""
    import logging

    if ray.is_initialized():
        return False
    # Ray reports usage statistics to its makers unless told not to; a sweep sends nothing out
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  logging_level=logging.WARNING, configure_logging=True)
    if options.ray_address:
        ray.init(address=options.ray_address, **kwargs)
        log(f"ray: connected to {options.ray_address}")
    else:
        num_cpus = options.num_workers or os.cpu_count() or 1
        # this machine only: the local Ray's processes talk over the loopback
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
        log(f"ray: started on this machine with {num_cpus} workers")
    return True


def _read_done(path: Path, header: list[str]) -> dict[str, dict]:
    """Rows of `path` whose status is ok, by point id (ValueError for other columns)."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != header:
            raise ValueError(f"{path} has other columns than this sweep's; write to another "
                             f"file or remove it")
        return {r["point_id"]: _parse(r) for r in reader if r["status"] == "ok"}


_TEXT_COLUMNS = {"point_id", "status", "error",
                 *(k for k, t in POINT_OPTIONS.items() if t is str)}


def _parse(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row back to numbers and booleans where it holds them."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in _TEXT_COLUMNS:
            out[k] = v
        elif v in ("True", "False"):
            out[k] = v == "True"
        elif v == "":
            out[k] = None
        else:
            try:
                out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
            except ValueError:
                out[k] = v
    return out


def _label(row: dict) -> str:
    keys = ("model", "tensor_parallel_size", "replicas", "prefill_replicas", "decode_replicas",
            "request_rate")
    return " ".join(f"{k}={row[k]}" for k in keys if row.get(k) not in (None, ""))


def _bar(total: int, show: bool) -> Any:
    if not show or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="point", desc="sweep")
