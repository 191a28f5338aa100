"""Answers from a sweep's table: the cheapest configuration that meets the SLO at each demand,
the highest rate each configuration sustains, and the Pareto plot (goodput per NPU against
TTFT p99 and TPOT p99).

A point meets the SLO when its TTFT p99 and TPOT p99 are within the bounds (sweep_run's
`meets_slo`); cheapest means fewest NPUs, then the most goodput per NPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.results import Slo

# What is asked for (the demand) vs how it is served (the shape).
DEMAND_KEYS = ("model", "npu", "request_rate", "time_scale", "start", "duration",
               "num_requests")
RATE_KEYS = ("request_rate", "time_scale")


@dataclass(frozen=True)
class Answer:
    """The cheapest configuration for one demand (None when no point meets the SLO)."""

    demand: dict[str, Any]  # the DEMAND_KEYS values the group shares
    best: dict[str, Any] | None  # the cheapest row meeting the SLO
    closest: dict[str, Any] | None  # without one: the row nearest to meeting it
    num_points: int  # finished points for this demand
    num_meeting: int  # of those, meeting the SLO


def shape_label(row: Mapping[str, Any]) -> str:
    """How a row serves its demand, in a few words (e.g. `3 x TP4 least-loaded`)."""
    tp = row.get("tensor_parallel_size") or 1
    if row.get("prefill_replicas"):
        text = f"{row['prefill_replicas']}P+{row['decode_replicas']}D x TP{tp}"
    else:
        text = f"{row.get('replicas') or 1} x TP{tp}"
        if (row.get("replicas") or 1) > 1:
            text += f" {row.get('router') or 'round-robin'}"
    extras = [f"{k}={row[k]}" for k in ("max_num_seqs", "max_num_batched_tokens",
                                          "mixed_prefill_budget", "speculative")
              if row.get(k) not in (None, "")]
    return " ".join([text, *extras])


def _ok(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def cheapest(rows: Sequence[Mapping[str, Any]], slo: Slo | None = None) -> list[Answer]:
    """Per demand, the fewest NPUs meeting the SLO (ties: the most goodput per NPU); without
    one, the row nearest to the SLO's bounds."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in _ok(rows):
        groups.setdefault(tuple(row.get(k) for k in DEMAND_KEYS), []).append(row)
    answers = []
    for key, group in groups.items():
        meeting = [r for r in group if r.get("meets_slo")]
        best = min(meeting, key=lambda r: (r["num_npus"], -(r.get("goodput_per_npu") or 0)),
                   default=None)
        closest = None if best else min(group, key=lambda r: _slo_miss(r, slo))
        answers.append(Answer(dict(zip(DEMAND_KEYS, key, strict=True)),
                              None if best is None else dict(best),
                              None if closest is None else dict(closest), len(group),
                              len(meeting)))
    return answers


def _slo_miss(row: Mapping[str, Any], slo: Slo | None) -> float:
    """How far a row is from meeting the SLO (the worse of its p99s over the bounds)."""
    if slo is None:
        return -(row.get("slo_attainment") or 0.0)
    ratios = [row["ttft_p99_s"] / slo.ttft_s if slo.ttft_s else 0.0,
              row["tpot_p99_s"] / slo.tpot_s if slo.tpot_s else 0.0]
    return max(ratios)


def highest_rates(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, float | None]]:
    """Per model and shape, the highest request_rate whose point meets the SLO (None: none
    does); empty when the sweep has one rate only."""
    rates = {r.get("request_rate") for r in _ok(rows)}
    if len(rates - {None}) < 2:
        return []
    best: dict[tuple[str, str], float | None] = {}
    for row in _ok(rows):
        key = (str(row.get("model")), shape_label(row))
        rate = row.get("request_rate")
        if row.get("meets_slo") and rate is not None:
            best[key] = max(best.get(key) or 0.0, float(rate))
        else:
            best.setdefault(key, None)
    return [(m, s, r) for (m, s), r in sorted(best.items())]


def format_answers(rows: Sequence[Mapping[str, Any]], slo: Slo | None) -> str:
    """The answers as the text `xyserve sweep` prints."""
    if slo is None:
        return "no SLO given (--slo ttft=S,tpot=S): no capacity answer"
    bounds = ", ".join(f"{k.removesuffix('_s').upper()} p99 <= {v:g} s"
                       for k, v in (("ttft_s", slo.ttft_s), ("tpot_s", slo.tpot_s)) if v)
    lines = [f"cheapest configuration meeting {bounds}:"]
    for a in sorted(cheapest(rows, slo), key=lambda a: tuple(str(v) for v in a.demand.values())):
        demand = " ".join(f"{k}={v}" for k, v in a.demand.items() if v is not None)
        if a.best is not None:
            b = a.best
            lines.append(f"  {demand}: {b['num_npus']} NPUs = {shape_label(b)} (TTFT p99 "
                         f"{b['ttft_p99_s']:.2f} s, TPOT p99 {1e3 * b['tpot_p99_s']:.0f} ms, "
                         f"goodput {b['goodput_per_npu']:.3f} req/s per NPU; {a.num_meeting} "
                         f"of {a.num_points} points meet it)")
        else:
            c = a.closest or {}
            lines.append(f"  {demand}: none of {a.num_points} points meets it (closest: "
                         f"{c.get('num_npus')} NPUs = {shape_label(c)}, TTFT p99 "
                         f"{c.get('ttft_p99_s', math.nan):.2f} s, TPOT p99 "
                         f"{1e3 * c.get('tpot_p99_s', math.nan):.0f} ms)")
    rates = highest_rates(rows)
    if rates:
        lines.append("highest request rate meeting it:")
        lines += [f"  {m} {s}: {'none of the rates' if r is None else f'{r:g} req/s'}"
                  for m, s, r in rates]
    return "\n".join(lines)


def write_pareto(rows: Sequence[Mapping[str, Any]], slo: Slo | None, path: Path,
                 title: str) -> Path:
    """Goodput per NPU against TTFT p99 and TPOT p99, a colour per model, each model's Pareto
    front drawn and labelled, the SLO's bounds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in _ok(rows) if r.get("goodput_per_npu") is not None]
    models = sorted({str(r["model"]) for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    panels = (("ttft_p99_s", "TTFT p99 (s)", slo.ttft_s if slo else None, 1.0),
              ("tpot_p99_s", "TPOT p99 (ms)", slo.tpot_s if slo else None, 1e3))
    for ax, (column, label, bound, scale) in zip(axes, panels, strict=True):
        for color, model in zip(plt.cm.tab10.colors, models, strict=False):
            mine = [r for r in ok if str(r["model"]) == model]
            xs = [r[column] * scale for r in mine]
            ys = [r["goodput_per_npu"] for r in mine]
            ax.scatter(xs, ys, color=color, alpha=0.55, s=[14 + 4 * r["num_npus"] for r in mine],
                       label=model)
            front = pareto_front(mine, column)
            ax.plot([r[column] * scale for r in front], [r["goodput_per_npu"] for r in front],
                    color=color, drawstyle="steps-post", linewidth=1.2)
            for r in front:
                rate = f" @ {r['request_rate']:g}/s" if r.get("request_rate") else ""
                ax.annotate(f"{r['num_npus']} NPU: {shape_label(r).split(' max')[0]}{rate}",
                            (r[column] * scale, r["goodput_per_npu"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points", color=color)
        if bound:
            ax.axvline(bound * scale, color="gray", linestyle="--", linewidth=1,
                       label="SLO bound")
        ax.set(xlabel=label, ylabel="goodput per NPU (req/s meeting the SLO)", xscale="log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(rows: Sequence[Mapping[str, Any]], column: str) -> list[Mapping[str, Any]]:
    """Rows no other row beats on both: lower `column` and higher goodput per NPU."""
    front: list[Mapping[str, Any]] = []
    for row in sorted(rows, key=lambda r: (r[column], -r["goodput_per_npu"])):
        if not math.isfinite(row[column]):
            continue
        if not front or row["goodput_per_npu"] > front[-1]["goodput_per_npu"]:
            front.append(row)
    return front
