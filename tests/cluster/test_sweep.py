"""`xyserve sweep`: the sweep file, points run in this process and as Ray tasks on a real local
Ray (2 CPUs, tiny workloads), a point that fails on purpose, --resume, the capacity answer and
the Pareto plot, and every CLI error path. Timing only, no torch."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any

import pytest

from cluster import sweep_exec
from cluster.capacity import cheapest, format_answers, pareto_front, shape_label
from cluster.results import Slo
from cluster.sweep_exec import ExecOptions, run_sweep
from cluster.sweep_spec import SweepError, load_sweep
from server.cli import main

TRACE_ROWS = 24  # a short Azure-format trace: one request every 0.25 s


@pytest.fixture
def trace(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "short_trace.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(TRACE_ROWS):
        lines.append(f"2023-11-16 18:15:{10 + i // 4:02d}.{25 * (i % 4):02d}00000,"
                     f"{300 + 53 * (i % 5)},{8 + 3 * (i % 4)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_sweep(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


FOUR_POINTS = """
workload: {trace: short_trace.csv, duration: 4}
slo: {ttft: 0.5, tpot: 0.05}
base: {model: llama-2-7b, max_num_batched_tokens: 1024}
points:
  - {replicas: 1, request_rate: 4}
  - {replicas: 1, request_rate: 8}
  - {replicas: 2, request_rate: 8}
  - {tensor_parallel_size: 3}   # does not divide the heads: fails on purpose
"""


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_file_expands_grid_and_points(tmp_path: pathlib.Path,
                                            trace: pathlib.Path) -> None:
    spec = load_sweep(write_sweep(tmp_path, FOUR_POINTS))
    assert len(spec.points) == 4
    assert spec.points[0] == {"model": "llama-2-7b", "duration": 4,
                              "max_num_batched_tokens": 1024, "replicas": 1,
                              "request_rate": 4}
    assert spec.points[3]["tensor_parallel_size"] == 3
    assert spec.slo == Slo(0.5, 0.05) and spec.workload.trace == str(trace.resolve())
    # a grid alone is its product; with points, each point under each grid combination
    grid = "workload: {trace: short_trace.csv}\ngrid: {model: [a, b], replicas: [1, 2, 3]}\n"
    assert len(load_sweep(write_sweep(tmp_path, grid)).points) == 6
    crossed = load_sweep(write_sweep(tmp_path, grid + "points: [{seed: 1}, {seed: 2}]")).points
    assert len(crossed) == 12 and crossed[1] == {"model": "a", "replicas": 1, "seed": 2}
    capped = "workload: {trace: short_trace.csv}\ngrid: {mixed_prefill_budget: [null, 256]}\n"
    assert [p["mixed_prefill_budget"] for p in load_sweep(write_sweep(tmp_path, capped)).points
            ] == [None, 256]


@pytest.mark.parametrize(("text", "message"), [
    ("workload: {trace: short_trace.csv}\ngrid: {replica: [1]}", "unknown option 'replica'"),
    ("workload: {trace: short_trace.csv}\ngrid: {replicas: [two]}", "replicas must be int"),
    ("workload: {trace: short_trace.csv}\ngrid: {replicas: []}", "non-empty list"),
    ("workload: {trace: short_trace.csv}\ngrid: {mixed_prefill_budget: [all]}",
     "mixed_prefill_budget must be"),
    ("workload: {trace: nowhere.csv}\npoints: [{}]", "no trace file"),
    ("grid: {replicas: [1]}", "exactly one of trace"),
    ("workload: {trace: short_trace.csv}", "no points"),
    ("workload: {trace: short_trace.csv}\npoints: [{}]\nslo: {ttft: -1}", "positive"),
    ("workload: {trace: short_trace.csv}\npoints: [{}]\nextra: 1", "unknown key 'extra'"),
    ("workload: [", "not YAML"),
])
def test_bad_sweep_files(tmp_path: pathlib.Path, trace: pathlib.Path, text: str,
                         message: str) -> None:
    with pytest.raises(SweepError, match=message):
        load_sweep(write_sweep(tmp_path, text))


def test_in_process_sweep_streams_rows_and_resumes(tmp_path: pathlib.Path,
                                                   trace: pathlib.Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_sweep(write_sweep(tmp_path, FOUR_POINTS))
    out = tmp_path / "out.csv"
    logs: list[str] = []
    rows = run_sweep(spec, out, ExecOptions(use_ray=False), logs.append)
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"]
    assert "does not divide num_heads" in rows[3]["error"]
    assert any("failed" in m for m in logs)
    table = read_csv(out)
    assert len(table) == 4 and [r["status"] for r in table].count("ok") == 3
    assert [r["num_npus"] for r in table[:3]] == ["1", "1", "2"]
    assert json.loads(out.with_suffix(".json").read_text())[0]["point_id"] == rows[0]["point_id"]
    # twice the rate, the same requests: more throughput
    assert rows[1]["request_throughput"] > 1.5 * rows[0]["request_throughput"]
    assert rows[0]["offered_rate"] == pytest.approx(4.0, rel=0.2)

    # --resume runs only what is not done (the failed point), and keeps the rest
    ran: list[dict[str, Any]] = []
    real = sweep_exec.run_point

    def counting(point: dict[str, Any], *args: Any) -> dict[str, Any]:
        ran.append(point)
        return real(point, *args)

    monkeypatch.setattr(sweep_exec, "run_point", counting)
    again = run_sweep(spec, out, ExecOptions(use_ray=False, resume=True), logs.append)
    assert [p.get("tensor_parallel_size") for p in ran] == [3]
    assert [r["point_id"] for r in again] == [r["point_id"] for r in rows]
    assert again[0]["ttft_p99_s"] == pytest.approx(rows[0]["ttft_p99_s"])
    assert any("resuming: 3 of 4 points" in m for m in logs)
    assert len(read_csv(out)) == 5  # the failed point's second try appended


def test_without_ray_the_points_run_in_process_and_it_says_so(
        tmp_path: pathlib.Path, trace: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_exec, "_import_ray", lambda: None)
    spec = load_sweep(write_sweep(tmp_path, FOUR_POINTS.split("grid:")[0]
                                  + "points: [{replicas: 2}]\n"))
    logs: list[str] = []
    rows = run_sweep(spec, tmp_path / "out.csv", ExecOptions(), logs.append)
    assert rows[0]["status"] == "ok"
    assert any("ray is not installed" in m and "one after another" in m for m in logs)


def test_real_local_ray_runs_the_points_and_reports_the_failure(
        tmp_path: pathlib.Path, trace: pathlib.Path) -> None:
    pytest.importorskip("ray")
    spec = load_sweep(write_sweep(tmp_path, FOUR_POINTS))
    logs: list[str] = []
    rows = run_sweep(spec, tmp_path / "ray.csv", ExecOptions(num_workers=2), logs.append)
    assert any("ray: started on this machine with 2 workers" in m for m in logs)
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"]
    assert "does not divide num_heads" in rows[3]["error"]
    # the same numbers as in this process: a point is a pure function of its options
    local = run_sweep(spec, tmp_path / "local.csv", ExecOptions(use_ray=False), logs.append)
    for a, b in zip(rows[:3], local[:3], strict=True):
        assert (a["ttft_p99_s"], a["goodput"]) == (b["ttft_p99_s"], b["goodput"])


ROWS = [
    dict(status="ok", model="m", request_rate=5, replicas=4, tensor_parallel_size=4, num_npus=16,
         meets_slo=True, goodput_per_npu=0.30, ttft_p99_s=0.9, tpot_p99_s=0.05),
    dict(status="ok", model="m", request_rate=5, replicas=3, tensor_parallel_size=4, num_npus=12,
         meets_slo=True, goodput_per_npu=0.40, ttft_p99_s=1.8, tpot_p99_s=0.09),
    dict(status="ok", model="m", request_rate=5, replicas=1, tensor_parallel_size=8, num_npus=8,
         meets_slo=False, goodput_per_npu=0.20, ttft_p99_s=9.0, tpot_p99_s=0.20),
    dict(status="ok", model="m", request_rate=5, prefill_replicas=1, decode_replicas=2,
         tensor_parallel_size=4, num_npus=12, meets_slo=True, goodput_per_npu=0.35,
         ttft_p99_s=1.2, tpot_p99_s=0.06),
    dict(status="error", model="m", request_rate=5, num_npus=None),
    dict(status="ok", model="m", request_rate=9, replicas=3, tensor_parallel_size=4, num_npus=12,
         meets_slo=False, goodput_per_npu=0.1, ttft_p99_s=5.0, tpot_p99_s=0.3),
]


def test_cheapest_configuration_meeting_the_slo() -> None:
    answers = {a.demand["request_rate"]: a for a in cheapest(ROWS, Slo(2.0, 0.1))}
    best = answers[5].best
    assert best is not None and best["num_npus"] == 12 and best["replicas"] == 3  # 0.40 > 0.35
    assert (answers[5].num_points, answers[5].num_meeting) == (4, 3)
    assert answers[9].best is None and answers[9].closest is not None
    text = format_answers(ROWS, Slo(2.0, 0.1))
    assert "request_rate=5: 12 NPUs = 3 x TP4 round-robin" in text
    assert "request_rate=9: none of 1 points meets it" in text
    assert "m 3 x TP4 round-robin: 5 req/s" in text  # the highest rate it sustains
    assert shape_label(ROWS[3]) == "1P+2D x TP4"


def test_pareto_front_keeps_the_undominated() -> None:
    ok = [r for r in ROWS if r["status"] == "ok" and r["request_rate"] == 5]
    front = pareto_front(ok, "ttft_p99_s")
    assert [r["num_npus"] for r in front] == [16, 12, 12]  # 0.9 s, then 1.2 s, then 1.8 s
    assert [r["goodput_per_npu"] for r in front] == [0.30, 0.35, 0.40]


def test_cli_runs_a_sweep_answers_and_plots(tmp_path: pathlib.Path, trace: pathlib.Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_sweep(tmp_path, FOUR_POINTS)
    out = tmp_path / "res" / "sweep.csv"
    assert main(["sweep", str(sweep), "--out", str(out), "--no-ray", "--slo",
                 "ttft=2,tpot=0.1"]) == 1  # one point failed
    printed = capsys.readouterr().out
    assert "4 points (1 failed)" in printed
    assert "cheapest configuration meeting TTFT p99 <= 2 s, TPOT p99 <= 0.1 s" in printed
    assert "1 NPUs = 1 x TP1" in printed
    assert (tmp_path / "res" / "sweep_pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize(("extra", "message"), [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--ray-address", "auto", "--no-ray"], "exclude each other"),
    (["--slo", "ttft=fast"], "not a number"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path: pathlib.Path, trace: pathlib.Path,
                                        capsys: pytest.CaptureFixture[str], extra: list[str],
                                        message: str) -> None:
    sweep = write_sweep(tmp_path, FOUR_POINTS)
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "o.csv"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("xyserve sweep: error:")
    assert message in err


def test_cli_bad_file_and_resume_mismatch(tmp_path: pathlib.Path, trace: pathlib.Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_sweep(tmp_path, "workload: {trace: short_trace.csv}\ngrid: {tp: [1]}")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o.csv")]) == 2
    assert "unknown option 'tp'" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    sweep = write_sweep(tmp_path, FOUR_POINTS)
    assert main(["sweep", str(sweep), "--out", str(other), "--resume", "--no-ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other columns" in err


def test_metric_columns_never_shadow_an_option() -> None:
    from cluster.sweep_run import METRIC_COLUMNS
    from cluster.sweep_spec import POINT_OPTIONS

    assert not set(METRIC_COLUMNS) & set(POINT_OPTIONS)
