"""`xyserve simulate` on cases whose answer is known without the simulator, its results files,
and the CLI's error paths. Timing only: no weights, no torch."""

from __future__ import annotations

import gc
import io
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tomllib

from cluster import driver
from cluster.cli import SimProgress, add_simulate_parser
from cluster.results import Slo
from cluster.simulation import Simulation
from cluster.workload import RequestSpec, Workload, synthetic
from server.cli import main

MODEL = "llama-2-7b"


def one_request(prompt_len: int, output_len: int, arrival_s: float = 1.0) -> Workload:
    return Workload((RequestSpec(arrival_s, prompt_len, output_len),), "one request")


def test_lone_request_ttft_is_its_prefill_steps() -> None:
    sim = Simulation(MODEL, max_num_batched_tokens=512)
    result = sim.run(one_request(prompt_len=1500, output_len=8, arrival_s=2.5))
    steps = result.recorder.steps
    (request,) = result.recorder.requests.values()
    # 1500 tokens in chunks of 512: three steps compute the prompt, the third samples
    prefill_s = sum(step[2] for step in steps[:3])
    assert [step[4] for step in steps[:3]] == [512, 512, 476]
    assert request.ttft_s == pytest.approx(prefill_s, rel=1e-12)
    assert request.queue_s == 0.0  # nothing else to wait for
    assert request.e2e_s == pytest.approx(sum(step[2] for step in steps), rel=1e-12)
    assert steps[0][1] == pytest.approx(2.5 + steps[0][2])  # the idle clock jumped to 2.5 s
    assert result.summary.num_steps == 3 + 7  # then one decode per remaining token


def test_slow_arrivals_never_queue() -> None:
    # one request every 5 simulated seconds, each served in well under one
    requests = tuple(RequestSpec(5.0 * i, 200, 20) for i in range(6))
    result = Simulation(MODEL).run(Workload(requests, "slow"))
    assert result.summary.num_requests == 6
    assert all(r.queue_s == 0.0 for r in result.recorder.requests.values())
    assert result.summary.queue_s["p99"] == 0.0


def test_a_run_collects_garbage_less_often_and_restores_the_collector() -> None:
    before = gc.get_threshold()
    seen = set()
    requests = tuple(RequestSpec(0.01 * i, 100, 5) for i in range(3))
    Simulation(MODEL).run(Workload(requests, "gc"), on_step=lambda _: seen.add(gc.get_threshold()))
    assert seen == {driver._SIMULATION_GC_THRESHOLD} != {before}
    assert gc.get_threshold() == before


def test_small_pool_preempts_and_counts_it() -> None:
    workload = synthetic(12, math.inf, "300", "200", seed=1)  # all at once
    small = Simulation(MODEL, num_kv_blocks=12, block_size=128, max_num_seqs=16)
    result = small.run(workload)
    assert result.summary.num_requests == 12  # all finish, some after recomputing
    assert result.summary.num_preemptions > 0
    assert result.summary.max_kv_cache_usage == 1.0
    roomy = Simulation(MODEL, max_num_seqs=16).run(workload)
    assert roomy.summary.num_preemptions == 0


def test_requests_that_never_fit_are_skipped_and_counted() -> None:
    requests = (RequestSpec(0.0, 100, 10), RequestSpec(0.1, 3000, 100), RequestSpec(0.2, 50, 5))
    result = Simulation(MODEL, num_kv_blocks=8, block_size=128).run(Workload(requests, "x"))
    assert result.summary.num_requests == 2 and result.summary.num_rejected == 1
    assert [r.index for r in result.rejected] == [1]
    assert "KV blocks" in result.rejected[0].reason


def test_goodput_counts_requests_within_the_slo() -> None:
    workload = synthetic(40, 20.0, "uniform:low=100,high=2000", "64", seed=3)
    result = Simulation(MODEL, max_num_batched_tokens=1024).run(
        workload, slo=Slo(ttft_s=0.2, tpot_s=1.0))
    s = result.summary
    met = [r for r in result.recorder.requests.values() if r.ttft_s <= 0.2]
    assert s.slo_attainment == pytest.approx(len(met) / s.num_requests)
    assert 0 < s.slo_attainment < 1  # the long prompts miss a 200 ms TTFT, short ones make it
    assert s.goodput == pytest.approx(len(met) / s.duration_s)


def test_mixed_prefill_budget_trades_long_prompt_ttft_for_stream_itl() -> None:
    # 32 streams decoding while four 4000-token prompts arrive
    requests = (*(RequestSpec(0.0, 64, 400) for _ in range(32)),
                *(RequestSpec(1.0 + 0.5 * i, 4000, 4) for i in range(4)))
    workload = Workload(requests, "mixed")
    whole = Simulation(MODEL, max_num_batched_tokens=2048, mixed_prefill_budget=2048).run(workload)
    capped = Simulation(MODEL, max_num_batched_tokens=2048, mixed_prefill_budget=256).run(
        workload)
    # after the streams' first step every step has decodes: at most 256 prompt tokens each;
    # the ITL tail shrinks, long prompts wait longer
    assert max(step[4] for step in capped.recorder.steps[1:]) == 256
    assert max(step[4] for step in whole.recorder.steps[1:]) == 2048 - 32
    assert capped.summary.itl_s["p99"] < 0.5 * whole.summary.itl_s["p99"]
    assert capped.summary.ttft_s["p99"] > whole.summary.ttft_s["p99"]


def test_speculation_is_simulated_with_its_acceptance_rate() -> None:
    workload = synthetic(4, math.inf, "200", "100", seed=2)
    plain = Simulation(MODEL).run(workload).summary
    always = Simulation(MODEL, speculative="ngram", num_speculative_tokens=4,
                        acceptance_rate=1.0).run(workload).summary
    never = Simulation(MODEL, speculative="ngram", num_speculative_tokens=4,
                       acceptance_rate=0.0).run(workload).summary
    assert always.num_steps < plain.num_steps / 3  # 5 tokens a verify: ~5x fewer steps
    assert never.num_steps >= plain.num_steps  # nothing accepted: one token a step, as plain
    assert always.num_requests == plain.num_requests == 4


def test_results_files(tmp_path: pathlib.Path) -> None:
    result = Simulation(MODEL).run(synthetic(30, 10.0, "300", "32", seed=0), Slo(2.0, 0.1))
    paths = result.write(tmp_path)
    names = {p.name for p in paths}
    assert names == {"summary.json", "requests.csv", "steps.csv", "latency_cdf.png",
                     "timeline.png"}
    for path in paths:
        assert path.stat().st_size > 1000 or path.suffix == ".json"
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(summary[key]) == {"mean", "p50", "p90", "p99"}
        assert summary[key]["p50"] <= summary[key]["p99"]
    assert summary["num_requests"] == 30
    assert summary["wall_s"] > 0 and summary["output_throughput"] > 0
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(rows) == 31 and rows[0].startswith("index,arrival_s")
    assert len((tmp_path / "steps.csv").read_text().splitlines()) == result.summary.num_steps + 1


def test_cli_prints_the_summary_and_writes_out(tmp_path: pathlib.Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--synthetic", "--num-requests", "20", "--request-rate", "8",
                 "--input-len", "lognormal:mean=400,sigma=0.5", "--output-len", "16",
                 "--slo", "ttft=1,tpot=100ms", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "TTFT (ms)" in out and "goodput" in out and "20 finished" in out
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "timeline.png").exists()


def test_the_progress_bar_redraws_on_the_wall_clock_and_ends_at_the_last_step() -> None:
    now_s = [0.0]
    out = io.StringIO()
    bar = SimProgress(10.0, clock=lambda: now_s[0], file=out)
    drawn = out.getvalue().count("\r")
    for i in range(1000):  # many steps within one redraw interval: drawn once, at the first
        bar.advance(0.001 * i)
    assert out.getvalue().count("\r") == drawn + 1 and "0.0/10" in out.getvalue()
    now_s[0] += SimProgress.REDRAW_S
    bar.advance(4.04)
    assert out.getvalue().count("\r") == drawn + 2 and "4.0/10" in out.getvalue()
    bar.advance(12.26)  # past the arrivals' span, within the interval: not drawn yet
    assert "12.3" not in out.getvalue()
    bar.close()
    assert "12.3" in out.getvalue().rsplit("\r", 1)[-1]


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_cli_shows_a_progress_bar_when_asked(flag: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--synthetic", "--num-requests", "20", "--request-rate", "8",
                 "--input-len", "100", "--output-len", "8", "--no-plots", flag]) == 0
    err = capsys.readouterr().err
    assert ("simulate:" in err and "sim s" in err) == (flag == "--progress")


def test_cli_runs_replicas_and_pd(tmp_path: pathlib.Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    common = ["simulate", "--synthetic", "--num-requests", "16", "--request-rate", "8",
              "--input-len", "300", "--output-len", "8"]
    assert main([*common, "--replicas", "2", "--router", "least-loaded"]) == 0
    out = capsys.readouterr().out
    assert "2 replicas (least-loaded) of 910b2" in out and "mixed-1" in out
    assert main([*common, "--prefill-replicas", "1", "--decode-replicas", "2",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "1P + 2D (kv over auto)" in out and "decode-2" in out and "16 finished" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_npus"] == 3 and len(summary["replicas"]) == 3
    transfers = (tmp_path / "kv_transfers.csv").read_text().splitlines()
    assert transfers[0].startswith("index,prefill_replica") and len(transfers) == 17


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt-5"], "unknown model 'gpt-5'"),
    (["--npu", "910c"], "unknown NPU '910c'"),
    (["--model", "llama-2-70b"], "leave no room for the KV cache"),
    (["--model", "qwen2.5-7b", "-tp", "8"], "does not divide num_heads=28"),
    (["--input-len", "lognormal:mean=5"], "length 'lognormal:mean=5'"),
    (["--request-rate", "-1"], "request rate must be positive"),
    (["--slo", "latency=1"], "expected ttft=SECONDS,tpot=SECONDS"),
    (["--max-num-seqs", "0"], "max_num_seqs must be at least 1"),
    (["--kv-reserve-fraction", "1.5"], "--kv-reserve-fraction must be in [0, 1)"),
    (["--replicas", "0"], "replicas must be at least 1"),
    (["--prefill-replicas", "2"], "at least one prefill replica and one decode replica"),
    (["--replicas", "2", "--prefill-replicas", "1", "--decode-replicas", "1"],
     "exclude each other"),
    (["--start", "-5"], "window start must be non-negative"),
])
def test_cli_errors_are_one_line(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--synthetic", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xyserve simulate: error: ") and message in err
    assert "\n" not in err


def test_cli_trace_errors_name_file_and_line(tmp_path: pathlib.Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "trace.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.1,lots,44\n")
    assert main(["simulate", "--trace", str(bad)]) == 2
    assert f"{bad}:3: cannot parse" in capsys.readouterr().err
    missing = tmp_path / "none.csv"
    assert main(["simulate", "--trace", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    not_json = tmp_path / "s.json"
    not_json.write_text("[{\"prompt_len\": 3,\n \"output_len\": }]")
    assert main(["simulate", "--trace", str(not_json), "--request-rate", "1"]) == 2
    assert f"{not_json}:2: not JSON" in capsys.readouterr().err


def test_simulate_needs_a_workload(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["simulate"])
    assert exc.value.code == 2
    assert "--trace" in capsys.readouterr().err


def test_long_latency_cdfs_are_drawn_at_evenly_spaced_ranks() -> None:
    from cluster.plots import MAX_CDF_POINTS, cdf_points

    assert cdf_points(0).tolist() == [] and cdf_points(5).tolist() == [0, 1, 2, 3, 4]
    assert len(cdf_points(MAX_CDF_POINTS)) == MAX_CDF_POINTS
    at = cdf_points(4_000_001)
    assert at[0] == 0 and at[-1] == 4_000_000 and len(at) == MAX_CDF_POINTS
    gaps = np.diff(at)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # evenly spaced, strictly rising


def test_the_console_script_runs_main_and_leaves_nothing_to_collect() -> None:
    # `xyserve` is console_main (pyproject.toml): main's status, the run's leftovers frozen out
    # of the collector's reach before the interpreter's last collection
    project = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["xyserve"] == "server.cli:console_main"
    code = ("import gc, sys; from server import cli; status = cli.console_main(); "
            "print('tracked', len(gc.get_objects()), 'frozen', gc.get_freeze_count()); "
            "sys.exit(status)")
    args = ["simulate", "--model", MODEL, "--synthetic", "--num-requests", "20",
            "--request-rate", "inf", "--input-len", "100", "--output-len", "8"]
    ok = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "simulator speed" in ok.stdout
    tracked, frozen = (int(w) for w in ok.stdout.split()[-3::2])
    assert frozen > 10_000 and tracked < frozen  # (the modules' and caches' objects, frozen)
    bad = subprocess.run([sys.executable, "-c", code, "simulate", "--model", "no-such-model",
                          "--synthetic"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no-such-model" in bad.stderr
