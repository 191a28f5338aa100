"""The tables and the plot of benchmarks.e2e_ablation (kept apart: formatting, not experiment)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cluster.results import Slo


def _fmt(x: float, spec: str = ".1f", suffix: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def report(table: list[dict[str, Any]]) -> str:
    """The per-mix table and the headline against the paper, as Markdown."""
    from benchmarks.e2e_ablation import PAPER

    lines = ["| model | mix | system | saturated QPS | vs baseline | sustainable rate (req/s) "
             "| vs baseline | TBT cut, best rate | TBT cut, mean over rates |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        base = r["system"] == "baseline"
        lines.append(
            f"| {r['model']} | {r['mix']} | {r['system']} | {_fmt(r['saturated_qps'], '.2f')} | "
            f"{'—' if base else _fmt(r['qps_gain_pct'], '+.0f', '%')} | "
            f"{_fmt(r['sustainable_rate'], '.2f')} | "
            f"{'—' if base else _fmt(r['rate_gain_pct'], '+.0f', '%')} | "
            f"{'—' if base else _fmt(r['tbt_cut_best_pct'], '+.0f', '%')} | "
            f"{'—' if base else _fmt(r['tbt_cut_mean_pct'], '+.0f', '%')} |")
    lines += ["", "| over the baseline, best case of all models and mixes | saturated QPS | "
              "sustainable rate | TBT (at the same rate) |", "| --- | --- | --- | --- |"]
    for system, paper in PAPER.items():
        sel = [r for r in table if r["system"] == system]
        best = {k: max((r[k] for r in sel if math.isfinite(r[k])), default=math.nan)
                for k in ("qps_gain_pct", "rate_gain_pct")}
        tbt = min((r["tbt_cut_best_pct"] for r in sel if math.isfinite(r["tbt_cut_best_pct"])),
                  default=math.nan)
        lines.append(f"| {system}, simulated | up to {_fmt(best['qps_gain_pct'], '+.0f', '%')} "
                     f"| up to {_fmt(best['rate_gain_pct'], '+.0f', '%')} | up to "
                     f"{_fmt(tbt, '+.0f', '%')} |")
        lines.append(f"| {system}, paper (XYS 7.4.1, Qwen2-7B) | up to "
                     f"{paper['qps_pct']:+.0f}% (QPS) | | up to {paper['tbt_pct']:+.0f}% |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, slo: Slo) -> Path:
    """Mean TBT and SLO attainment against the offered rate, one row of panels per model x
    mix, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.e2e_ablation import ATTAINMENT, SYSTEMS

    panels = list(dict.fromkeys((r["model"], r["mix"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.8 * len(panels)), squeeze=False)
    for (model, mix), (ax_tbt, ax_slo) in zip(panels, axes, strict=True):
        for system in SYSTEMS:
            sel = sorted((r for r in rows if (r["model"], r["mix"], r["system"]) ==
                          (model, mix, system) and math.isfinite(r["rate"])),
                         key=lambda r: r["rate"])
            rates = [r["rate"] for r in sel]
            ax_tbt.plot(rates, [r["tbt_mean_s"] * 1e3 for r in sel], marker="o", label=system)
            ax_slo.plot(rates, [r["slo_attainment"] for r in sel], marker="o", label=system)
        ax_tbt.set_yscale("log")
        ax_tbt.set_ylabel("mean TBT (ms)")
        ax_tbt.set_title(f"{model}, {mix}", fontsize=9)
        ax_slo.axhline(ATTAINMENT, color="k", ls=":", lw=0.8)
        ax_slo.set_ylim(-0.05, 1.05)
        ax_slo.set_ylabel("SLO attainment")
        ax_slo.set_title(f"TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s * 1e3:g} ms",
                         fontsize=9)
        for ax in (ax_tbt, ax_slo):
            ax.set_xlabel("offered rate (req/s)")
            ax.grid(alpha=0.3)
        ax_tbt.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
