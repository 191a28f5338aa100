"""A simulation's plots (matplotlib, Agg): latency CDFs, and queue length, batch tokens, KV usage
and throughput over simulated time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.recorder import STEP_COLUMNS, Recorder

# Steps are many (tens of thousands); time series are averaged into this many bins.
NUM_TIME_BINS = 400
MAX_CDF_POINTS = 2000  # points of a latency CDF drawn (cdf_points)


def cdf_points(num_values: int) -> np.ndarray:
    """Where an empirical CDF of num_values sorted values is drawn: every value up to
    MAX_CDF_POINTS, else that many evenly spaced ranks, the first and last included (a long
    trace has millions of inter-token latencies: drawing each took ~2 s of `simulate --out`,
    for a curve no screen tells apart)."""
    if num_values <= MAX_CDF_POINTS:
        return np.arange(num_values)
    return np.unique(np.linspace(0, num_values - 1, MAX_CDF_POINTS).round().astype(np.int64))


def write_plots(recorder: Recorder, out_dir: Path, title: str) -> list[Path]:
    """latency_cdf.png and timeline.png in out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in recorder.requests.values() if r.finish_reason]
    series = {
        "TTFT": [r.ttft_s for r in done], "TPOT": [r.tpot_s for r in done],
        "ITL": np.frombuffer(recorder.itls_s, dtype=np.float64),
        "E2E": [r.e2e_s for r in done],
    }
    # (margins set, not a layout engine's: constrained layout drew each figure over again to
    # measure its text, ~0.2 s a figure)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.15, top=0.82, wspace=0.28)
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        v = np.sort(np.asarray(values, dtype=np.float64))
        v = v[np.isfinite(v)]
        if len(v):
            at = cdf_points(len(v))
            ax.plot(v[at], (at + 1) / len(v), color="tab:blue")
            ax.set_xscale("log")
        ax.set(title=f"{name} CDF", xlabel="simulated seconds", ylabel="fraction", ylim=(0, 1))
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    cdf = out_dir / "latency_cdf.png"
    fig.savefig(cdf, dpi=110)
    plt.close(fig)

    steps = np.asarray(recorder.steps, dtype=np.float64).reshape(-1, len(STEP_COLUMNS))
    col = {name: i for i, name in enumerate(STEP_COLUMNS)}
    end = steps[:, col["end_s"]]
    panels = [
        ("requests", [("waiting", steps[:, col["num_waiting"]]),
                      ("running", steps[:, col["num_running"]])]),
        ("tokens per step", [("prompt", steps[:, col["num_prompt_tokens"]]),
                             ("generated", steps[:, col["num_generation_tokens"]])]),
        ("KV cache usage", [("used", steps[:, col["kv_cache_usage"]])]),
    ]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.06, top=0.94, hspace=0.12)
    edges = np.linspace(end.min(), end.max(), NUM_TIME_BINS + 1) if len(end) else np.zeros(2)
    which = np.clip(np.digitize(end, edges) - 1, 0, NUM_TIME_BINS - 1)
    centers = (edges[:-1] + edges[1:]) / 2
    count = np.bincount(which, minlength=NUM_TIME_BINS)
    shown = count > 0
    for ax, (name, lines) in zip(axes, panels, strict=False):
        for label, values in lines:
            mean = np.bincount(which, weights=values, minlength=NUM_TIME_BINS)[shown] / count[shown]
            ax.plot(centers[shown], mean, label=label)
        ax.set(ylabel=name)
        ax.legend(loc="upper right")
        ax.grid(True, alpha=0.3)
    width = np.diff(edges)
    generated = np.bincount(which, weights=steps[:, col["num_generation_tokens"]],
                            minlength=NUM_TIME_BINS)
    axes[3].plot(centers, generated / np.maximum(width, 1e-12), label="output tokens/s")
    axes[3].set(ylabel="throughput", xlabel="simulated time (s)")
    axes[3].legend(loc="upper right")
    axes[3].grid(True, alpha=0.3)
    fig.suptitle(title)
    timeline = out_dir / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    return [cdf, timeline]
