"""`xyserve kernels` (benchmarks.kernels.sweeps.main) in quick mode: tables, CSVs, plot, traces."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.kernels.sweeps import main
from engine.config import DEFAULT_NPU


def test_quick_sweep_writes_tables_plot_and_traces(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, traces = tmp_path / "out", tmp_path / "traces"
    assert main(["--out", str(out), "--quick", "--npu-trace", str(traces)]) == 0
    printed = capsys.readouterr().out
    assert "paper: 14.6%" in printed and "paper: 21.5%" in printed and "paper: 28.6%" in printed
    gemm = list(csv.DictReader((out / "gemm.csv").open()))
    assert {r["model"] for r in gemm} == {"llama-2-7b", "llama-3-8b", "qwen2.5-7b"}
    assert {r["op"] for r in gemm} == {"qkv", "o", "gate_up", "down"}
    assert all(float(r["virtual_us"]) > 0 and float(r["speedup"]) > 0 for r in gemm)
    # M = 520 pads to the 1024 bucket: virtual padding wins big there
    row = next(r for r in gemm
               if r["model"] == "llama-2-7b" and r["op"] == "qkv" and r["M"] == "520")
    assert row["M_bucket"] == "1024" and float(row["speedup"]) > 1.3
    # ... and gains far less over torch-npu's linear on the exact M (no bucket to pad to)
    assert 0.8 < float(row["speedup_vs_atb"]) < float(row["speedup"])
    assert "over torch-npu linear on the exact M" in printed
    attention = list(csv.DictReader((out / "attention.csv").open()))
    assert {r["kind"] for r in attention} == {"decode", "prefill", "mixed"}
    verify = list(csv.DictReader((out / "verify.csv").open()))
    assert {(r["batch"], r["spec_len"], r["tokens"]) for r in verify} == {
        ("4", "31", "128"), ("8", "15", "128")}  # specLen drafts + the root per request
    assert {r["model"] for r in verify} == {"llama-2-7b"} and len(verify) == 4
    assert all(float(r["meta_us"]) > 0 and float(r["split_us"]) > 0 for r in verify)
    assert all(int(r["meta_tile_rows"]) >= 64 for r in verify)
    assert "on verify" in (out / "summary.txt").read_text()
    decode = list(csv.DictReader((out / "decode.csv").open()))
    assert {(r["policy"], r["batch"]) for r in decode} == {
        ("xy-serve", "1"), ("baseline", "1"), ("xy-serve", "64"), ("baseline", "64")}
    assert (out / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SmoothGEMM" in (out / "summary.txt").read_text()
    for label in ("xy-serve", "baseline"):
        doc = json.loads((traces / f"step-{label}.json").read_text())
        assert any(e["ph"] == "X" for e in doc["traceEvents"])


def test_bad_chip_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a preset"):
        main(["--out", str(tmp_path), "--quick", "--npu", "nope", "--no-plot"])


def test_help_shows_every_default_and_the_output_is_git_ignored(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in (f"(default: {DEFAULT_NPU})", "(default: kernels-out)", "(default: bf16)",
                    "(default: llama-2-7b,llama-3-8b,qwen2.5-7b)"):
        assert default in text, default
    assert "(default: False)" not in text and "(default: None)" not in text
    repo = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "kernels-out/x.csv"],
                             check=False)
    assert ignored.returncode == 0  # the default output never shows up in `git status`
