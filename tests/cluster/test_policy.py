"""`xyserve simulate` under the baseline's lowering (engine.lowering.BASELINE_POLICY): the same
scheduler and steps, only the kernels change, and the summary says which ran."""

from __future__ import annotations

import json
import pathlib

import pytest

from cluster.simulation import Simulation
from cluster.workload import synthetic
from engine.lowering import BASELINE_POLICY, DEFAULT_POLICY
from server.cli import main

MODEL = "llama-2-7b"


def test_baseline_lowering_takes_the_same_steps_and_more_time() -> None:
    workload = synthetic(24, 50.0, "uniform:low=100,high=700", "uniform:low=4,high=24", seed=3)
    runs = {}
    for name, policy in (("xy", DEFAULT_POLICY), ("baseline", BASELINE_POLICY)):
        # a fixed pool: both runs schedule the same chunks whatever their step times
        sim = Simulation(MODEL, lowering=policy, max_num_batched_tokens=512, num_kv_blocks=400)
        runs[name] = sim.run(workload)
    xy, base = runs["xy"], runs["baseline"]
    assert xy.summary.lowering == "virtual+meta"
    assert base.summary.lowering == "bucket+split"
    assert xy.summary.stack == base.summary.stack == "xyserve"
    assert xy.summary.scheduling == "token_budget"
    # bucket padding and split kernels cost device time on every step with ragged shapes
    assert base.summary.duration_s > xy.summary.duration_s
    assert base.summary.num_requests == xy.summary.num_requests == 24


def test_cli_policy_flags_reach_the_summary(tmp_path: pathlib.Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--synthetic", "--num-requests", "6", "--input-len", "300",
                 "--output-len", "4", "--gemm-policy", "bucket", "--attention-policy", "split",
                 "--scheduling-policy", "prefill_first", "--stack", "vllm-ascend",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "vllm-ascend host overhead, bucket+split kernels, prefill_first scheduling" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["stack"], summary["lowering"], summary["scheduling"]) == (
        "vllm-ascend", "bucket+split", "prefill_first")


def test_cli_rejects_an_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--synthetic", "--gemm-policy", "padded"])
    assert exc.value.code == 2
    assert "--gemm-policy: invalid choice: 'padded'" in capsys.readouterr().err
