"""The end-to-end experiments' own logic: the ShareGPT-like workload at CE's totals, the
sustainable-rate interpolation, the comparison against the baseline, and a miniature ablation
through main() (CSV, Markdown, plot)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

import benchmarks.e2e_ablation as ablation
from benchmarks.e2e_ablation import compare, sustainable_rate
from benchmarks.e2e_workloads import (
    CE_OUTPUT_TOKENS,
    CE_PROMPT_TOKENS,
    MAX_PROMPT,
    MAX_TOTAL,
    MIN_LEN,
    fixed,
    sharegpt_like,
)


def test_sharegpt_like_hits_the_published_totals_within_vllm_bench_filters() -> None:
    w = sharegpt_like()
    prompts = [r.prompt_len for r in w.requests]
    outputs = [r.output_len for r in w.requests]
    assert len(w.requests) == 1000 and {r.arrival_s for r in w.requests} == {0.0}
    assert sum(prompts) == CE_PROMPT_TOKENS and sum(outputs) == CE_OUTPUT_TOKENS
    assert min(prompts) >= MIN_LEN and max(prompts) <= MAX_PROMPT
    assert min(outputs) >= MIN_LEN and max(p + o for p, o in zip(prompts, outputs,
                                                                  strict=True)) <= MAX_TOTAL
    prompts.sort()
    assert prompts[500] < 0.8 * CE_PROMPT_TOKENS / 1000  # heavy-tailed: median below the mean
    assert sharegpt_like() == w and sharegpt_like(seed=1) != w  # seeded


def test_scaled_and_timed_workloads() -> None:
    w = sharegpt_like(100, rate=5.0, seed=2)
    assert sum(r.prompt_len for r in w.requests) == round(CE_PROMPT_TOKENS / 10)
    times = [r.arrival_s for r in w.requests]
    assert times == sorted(times) and 10 < times[-1] < 40  # ~20 s of Poisson arrivals
    f = fixed(10, math.inf, 2048, 128, "prefill-heavy")
    assert {(r.prompt_len, r.output_len) for r in f.requests} == {(2048, 128)}


@pytest.mark.parametrize(("points", "rate"), [
    ([(1, 1.0), (2, 1.0), (4, 0.5)], 2 + 2 * 0.1 / 0.5),  # crosses 0.9 between 2 and 4
    ([(1, 1.0), (2, 0.95)], 2.0),  # never fails: the highest swept rate
    ([(1, 0.5), (2, 0.2)], 0.0),  # fails from the start
    ([(4, 0.5), (1, 1.0)], 1 + 3 * 0.1 / 0.5),  # unsorted input
])
def test_sustainable_rate_interpolates_the_attainment(points: list[tuple[float, float]],
                                                      rate: float) -> None:
    assert sustainable_rate(points) == pytest.approx(rate)


def test_compare_gains_over_the_baseline() -> None:
    def row(system: str, rate: float, qps: float, tbt: float, slo: float) -> dict[str, object]:
        return {"model": "m", "mix": "x", "system": system, "rate": rate,
                "request_throughput": qps, "tbt_mean_s": tbt, "slo_attainment": slo}

    rows = [row("baseline", 1, 1, 0.02, 1), row("baseline", 2, 2, 0.04, 0.5),
            row("baseline", math.inf, 2, 0.05, 0),
            row("kernels", 1, 1, 0.01, 1), row("kernels", 2, 2, 0.03, 1),
            row("kernels", math.inf, 3, 0.04, 0),
            row("xy-serve", 1, 1, 0.02, 1), row("xy-serve", 2, 2, 0.04, 1),
            row("xy-serve", math.inf, 2, 0.05, 0)]
    out = {r["system"]: r for r in compare(rows)}
    assert out["kernels"]["qps_gain_pct"] == pytest.approx(50)
    assert out["kernels"]["sustainable_rate"] == 2.0
    assert out["baseline"]["sustainable_rate"] == pytest.approx(1 + 0.1 / 0.5)
    assert out["kernels"]["rate_gain_pct"] == pytest.approx((2 / 1.2 - 1) * 100)
    assert out["kernels"]["tbt_cut_best_pct"] == pytest.approx(-50)
    assert out["kernels"]["tbt_cut_mean_pct"] == pytest.approx((-50 - 25) / 2)


def test_miniature_ablation_writes_csv_report_and_plot(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ablation, "MIXES", {
        "tiny": ablation.Mix(lambda n, r, seed: fixed(n, r, 300, 8, "tiny", seed), (4.0, 400.0),
                             8)})
    assert ablation.main(["--models", "llama-2-7b", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert len(rows) == 3 * 3  # two rates and the saturated run, three systems
    assert {r["system"] for r in rows} == set(ablation.SYSTEMS)
    text = (tmp_path / "ablation.md").read_text()
    assert "paper (XYS 7.4.1, Qwen2-7B) | up to +89% (QPS)" in text
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    # --resume reads every run back from ablation.csv instead of simulating it again
    monkeypatch.setattr(ablation, "run_one", lambda *args: pytest.fail("ran again"))
    assert ablation.main(["--models", "llama-2-7b", "--out", str(tmp_path), "--resume",
                          "--no-plot"]) == 0
    assert (tmp_path / "ablation.md").read_text() == text
