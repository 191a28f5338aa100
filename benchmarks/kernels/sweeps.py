"""`xyserve kernels`: XY-Serve's two kernel ideas against their baselines, on the simulated NPU.

- GEMM: virtual padding (SmoothGEMM) vs M padded to static buckets (a pad-copy kernel plus the
  padded GEMM), over M = 1..8192 for the projections of Llama-2-7B, Llama-3-8B and Qwen2.5-7B;
  and vs torch-npu's linear on the exact M (ATB's tiling, no padding: the paper's baseline).
- Attention: the meta-kernel vs split prefill / decode kernels, on decode-only, prefill-only
  (with and without a cached prefix), mixed chunked-prefill and verify batches with skewed
  lengths.
- Verify (XYS 7.2.4): Llama-2-7B, batch 4 x specLen 31 and batch 8 x specLen 15 token trees over
  a few context lengths, the meta-kernel (verify tiles and their tree masks in one launch) vs the
  split baseline's full-mask prefill-style kernel.
- Model steps: simulated decode time per token of Llama-2-7B (batch 1 and 64), both policies.

Everything runs in timing-only mode through the same lowering the engine uses (engine.lowering
policies); the attention and verify sweeps live in benchmarks.kernels.attention. Prints tables,
writes CSVs and a PNG plot to --out, and the average speedups next to the paper's (SmoothGEMM 14.6%,
Meta-Attention 21.5% on average and 28.6% on verify, XYS 7.2-7.3). The model is not tuned to hit
them: what it gives is what it prints.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.kernels.attention import (
    ATTENTION_MODELS,
    BLOCK_SIZE,
    QUICK_VERIFY_CONTEXTS,
    VERIFY_CONTEXTS,
    VERIFY_MODEL,
    attention_sweep,
    seconds,
    verify_sweep,
)
from benchmarks.kernels.harness import time_step
from engine.arch import ModelArch
from engine.arch_presets import get_arch
from engine.config import DEFAULT_NPU
from engine.lowering import BASELINE_POLICY, GRAPH_BUCKETS, GemmPolicy, LoweringPolicy, lower_gemm
from npu_sim.device import Device
from npu_sim.gemm_tiling import atb_tiling
from npu_sim.hardware import load_chip
from npu_sim.trace import write_perfetto

PAPER_GEMM_PCT = 14.6  # SmoothGEMM vs torch-npu linear, average (XYS 7.3)
PAPER_ATTENTION_PCT = 21.5  # Meta-Attention vs PFA / IFA, average (XYS 7.2)
PAPER_VERIFY_PCT = 28.6  # Meta-Attention vs PFA (compute-only) on verify, average (XYS 7.2.4)
GEMM_MODELS = ("llama-2-7b", "llama-3-8b", "qwen2.5-7b")
POWERS = tuple(2**i for i in range(14))  # 1 .. 8192
RAGGED = (3, 24, 100, 200, 333, 520, 1000, 1500, 2100, 3000, 4200, 5000, 7000)
QUICK_MS = (1, 16, 100, 520, 1500, 4096)
DEFAULT_OUT = Path("kernels-out")  # relative to the working directory; git-ignored in the repo


def projections(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """The four per-layer GEMMs as op -> (N, K)."""
    h, d = arch.hidden_size, arch.head_dim
    return {
        "qkv": ((arch.num_heads + 2 * arch.num_kv_heads) * d, h),
        "o": (h, arch.num_heads * d),
        "gate_up": (2 * arch.intermediate_size, h),
        "down": (h, arch.intermediate_size),
    }


# ------------------------------------------------------------------------------------ GEMM

def gemm_sweep(device: Device, models: Sequence[str], ms: Sequence[int],
               buckets: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    bucket = LoweringPolicy(gemm=GemmPolicy.BUCKET, gemm_buckets=buckets)
    for model in models:
        for op, (n, k) in projections(get_arch(model)).items():
            for m in ms:
                t_v, (tv,) = seconds(device, lower_gemm(op, m, n, k, device.chip))
                t_b, timings = seconds(device, lower_gemm(op, m, n, k, device.chip, bucket))
                # torch-npu's linear on the exact M (ATB's tiling, no bucket): the paper's
                # SmoothGEMM baseline taken literally (XYS 7.3)
                t_a, _ = seconds(device, [atb_tiling(m, n, k, device.chip).kernel(
                    op, m, n, k, device.chip)])
                flops = 2.0 * m * n * k
                rows.append({
                    "model": model, "op": op, "M": m, "N": n, "K": k,
                    "M_bucket": timings[-1].kernel.m,
                    "virtual_us": t_v * 1e6, "bucket_us": t_b * 1e6,
                    "bucket_copy_us": timings[0].seconds * 1e6,
                    "speedup": t_b / t_v, "atb_us": t_a * 1e6, "speedup_vs_atb": t_a / t_v,
                    "virtual_tflops": flops / t_v / 1e12, "bucket_tflops": flops / t_b / 1e12,
                    "virtual_waste": tv.padding_waste, "bucket_waste": timings[-1].padding_waste,
                    "virtual_bound": tv.bound,
                })
    return rows


# ----------------------------------------------------------------------------- model steps

def decode_report(chip: Any, batches: Sequence[int] = (1, 64), context: int = 1024,
                  model: str = "llama-2-7b") -> list[dict[str, Any]]:
    """Simulated decode step of `model` at each batch size, all sequences at `context`."""
    rows = []
    for bs in batches:
        specs = [(context, 1)] * bs
        for label, policy in (("xy-serve", LoweringPolicy()), ("baseline", BASELINE_POLICY)):
            tr = time_step(model, specs, chip, block_size=BLOCK_SIZE, policy=policy)
            rows.append({
                "model": model, "policy": label, "batch": bs, "context": context,
                "step_ms": tr.sim_s * 1e3, "device_ms": tr.device_s * 1e3,
                "ms_per_token": tr.sim_s * 1e3,  # one token per sequence per step
                "tokens_per_s": bs / tr.sim_s, "hbm_tb_per_s": tr.hbm_bytes / tr.device_s / 1e12,
                "gemm_ms": tr.kernel_s_by_primitive.get("gemm", 0) * 1e3,
                "attention_ms": tr.kernel_s_by_primitive.get("attention", 0) * 1e3,
                "vector_ms": tr.kernel_s_by_primitive.get("vector", 0) * 1e3,
            })
    return rows


# ---------------------------------------------------------------------------------- output

def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def averages(rows: list[dict[str, Any]], key: str = "speedup") -> dict[str, float]:
    """Mean speedup in percent (t_base / t_new - 1), geometric mean, and mean latency cut."""
    s = np.array([r[key] for r in rows])
    return {"mean_speedup_pct": float((s - 1).mean() * 100),
            "geomean_speedup_pct": float((np.exp(np.log(s).mean()) - 1) * 100),
            "mean_latency_cut_pct": float((1 - 1 / s).mean() * 100)}


def plot(out: Path, gemm: list[dict[str, Any]], attention: list[dict[str, Any]],
         peak_tflops: float) -> Path:
    """kernels.png: small multiples, one column per projection. Top row: speedup of virtual
    padding over bucket padding, one line per model; middle: TFLOPS of both (solid virtual,
    dashed bucket) under the chip's peak; bottom: attention and verify speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in gemm))
    models = list(dict.fromkeys(r["model"] for r in gemm))
    colors = dict(zip(models, plt.get_cmap("tab10").colors, strict=False))
    fig = plt.figure(figsize=(5 * len(ops), 8 + 0.22 * len(attention)))
    grid = fig.add_gridspec(3, len(ops), height_ratios=(1, 1, max(1.0, 0.06 * len(attention))))
    speed_axes = [fig.add_subplot(grid[0, i]) for i in range(len(ops))]
    flops_axes = [fig.add_subplot(grid[1, i], sharex=speed_axes[i]) for i in range(len(ops))]
    for op, ax_s, ax_f in zip(ops, speed_axes, flops_axes, strict=True):
        for model in models:
            sel = sorted((r for r in gemm if r["model"] == model and r["op"] == op),
                         key=lambda r: r["M"])
            ms = [r["M"] for r in sel]
            color = colors[model]
            ax_s.plot(ms, [r["speedup"] for r in sel], marker=".", color=color, label=model)
            ax_f.plot(ms, [r["virtual_tflops"] for r in sel], color=color,
                      label=f"{model} virtual")
            ax_f.plot(ms, [r["bucket_tflops"] for r in sel], "--", color=color,
                      label=f"{model} bucket")
        ax_s.axhline(1 + PAPER_GEMM_PCT / 100, color="k", ls=":",
                     label=f"paper avg ({PAPER_GEMM_PCT}%)")
        ax_s.axhline(1, color="grey", lw=0.5)
        ax_s.set_title(f"GEMM {op}: bucket time / virtual-padding time")
        ax_f.axhline(peak_tflops, color="red", lw=1, label=f"chip peak ({peak_tflops:.0f})")
        ax_f.set_title(f"GEMM {op}: TFLOPS")
        ax_f.set_ylim(0, peak_tflops * 1.08)
        for ax in (ax_s, ax_f):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.grid(alpha=0.3)
    speed_axes[0].set_ylabel("speedup")
    speed_axes[0].legend(fontsize=8)
    flops_axes[0].set_ylabel("TFLOPS")
    flops_axes[0].legend(fontsize=7)
    ax3 = fig.add_subplot(grid[2, :])
    labels = [f"{r['model']}: {r['scenario']}" if "scenario" in r else
              f"{r['model']}: verify bs{r['batch']} x {r['spec_len']}, ctx {r['context']}"
              for r in attention]
    ax3.barh(range(len(attention)), [r["speedup"] for r in attention], color="tab:blue")
    ax3.set_yticks(range(len(attention)), labels, fontsize=7)
    ax3.invert_yaxis()
    ax3.axvline(1 + PAPER_ATTENTION_PCT / 100, color="k", ls=":",
                label=f"paper avg ({PAPER_ATTENTION_PCT}%)")
    ax3.axvline(1, color="grey", lw=0.5)
    ax3.set_xlabel("split time / meta-kernel time")
    ax3.set_title("Attention and verify: meta-kernel vs split prefill/decode kernels")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    path = out / "kernels.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, but for switches and options without one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xyserve kernels [sweep]", description=__doc__.split("\n")[0],
        formatter_class=_DefaultsHelp,
        epilog="One kernel's time: `xyserve kernels gemm --help`, `xyserve kernels attention "
               "--help`.")
    parser.add_argument("--npu", default=DEFAULT_NPU,
                        help="simulated chip: a preset (910b1..910b4) or a JSON / YAML chip file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory of the CSVs, summary.txt and kernels.png (git-ignored "
                             "inside the repository)")
    parser.add_argument("--models", default=",".join(GEMM_MODELS),
                        help="models whose projections the GEMM sweep runs (comma-separated)")
    parser.add_argument("--attention-models", default=",".join(ATTENTION_MODELS),
                        help="models of the attention sweep (comma-separated)")
    parser.add_argument("--buckets", default=",".join(map(str, GRAPH_BUCKETS)),
                        help="static M buckets of the GEMM baseline")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"),
                        help="operand dtype the cost model assumes")
    parser.add_argument("--quick", action="store_true",
                        help="a few points per sweep (seconds instead of a minute)")
    parser.add_argument("--no-plot", action="store_true", help="skip kernels.png")
    parser.add_argument("--npu-trace", type=Path, default=None, metavar="DIR",
                        help="also write Perfetto timelines of one mixed step (both policies)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    chip = load_chip(args.npu)
    device = Device(chip, compute=False, dtype=args.dtype)
    buckets = tuple(sorted(int(b) for b in args.buckets.split(",")))
    ms = QUICK_MS if args.quick else tuple(sorted(set(POWERS + RAGGED)))
    args.out.mkdir(parents=True, exist_ok=True)

    gemm = gemm_sweep(device, args.models.split(","), ms, buckets)
    attention = attention_sweep(device, args.attention_models.split(","), args.quick)
    verify = verify_sweep(device, QUICK_VERIFY_CONTEXTS if args.quick else VERIFY_CONTEXTS)
    decode = decode_report(chip)
    for name, rows in (("gemm", gemm), ("attention", attention), ("verify", verify),
                       ("decode", decode)):
        _write_csv(args.out / f"{name}.csv", rows)
    print(f"NPU {chip.name}: {chip.num_cube_cores} AIC / {chip.num_vector_cores} AIV at "
          f"{chip.clock_hz / 1e9:.2f} GHz, {chip.peak_flops(args.dtype) / 1e12:.0f} TFLOPS "
          f"{args.dtype}, HBM {chip.hbm_bytes_per_s / 1e12:.2f} TB/s\n")
    print("GEMM: virtual padding vs bucket padding (times include launch overheads)")
    print(_table(gemm, ["model", "op", "M", "M_bucket", "virtual_us", "bucket_us", "speedup",
                        "atb_us", "speedup_vs_atb", "virtual_tflops", "virtual_waste",
                        "bucket_waste"]))
    print("\nAttention: meta-kernel vs split prefill/decode kernels")
    print(_table(attention, ["model", "scenario", "tokens", "meta_us", "split_us", "speedup",
                             "speedup_cube_qk", "meta_pipeline", "meta_balance",
                             "split_balance"]))
    print("\nVerify (a binary draft tree of specLen nodes after each root): meta-kernel vs "
          "full-mask prefill-style kernel")
    print(_table(verify, ["model", "batch", "spec_len", "context", "tokens", "meta_us",
                          "split_us", "speedup", "meta_tile_rows", "split_tile_rows",
                          "meta_pipeline", "meta_balance", "split_balance"]))
    print("\nDecode step (one token per sequence)")
    print(_table(decode, ["model", "policy", "batch", "context", "ms_per_token", "device_ms",
                          "tokens_per_s", "hbm_tb_per_s"]))
    g, a, v = averages(gemm), averages(attention), averages(verify)
    summary = [
        f"SmoothGEMM (virtual padding) over bucket padding: mean {g['mean_speedup_pct']:.1f}% "
        f"faster (geomean {g['geomean_speedup_pct']:.1f}%, mean latency cut "
        f"{g['mean_latency_cut_pct']:.1f}%); paper: {PAPER_GEMM_PCT}% over torch-npu linear",
        f"  over torch-npu linear on the exact M (ATB's tiling, no bucket copy): mean "
        f"{averages(gemm, 'speedup_vs_atb')['mean_speedup_pct']:.1f}% faster",
        f"Meta-Attention over split kernels: mean {a['mean_speedup_pct']:.1f}% faster (geomean "
        f"{a['geomean_speedup_pct']:.1f}%, mean latency cut {a['mean_latency_cut_pct']:.1f}%); "
        f"paper: {PAPER_ATTENTION_PCT}% over PFA/IFA",
        f"  of which without the 2-stage decode pipeline (QK on the cube): mean "
        f"{averages(attention, 'speedup_cube_qk')['mean_speedup_pct']:.1f}% faster",
        f"Meta-Attention on verify (token trees, {VERIFY_MODEL}, bs4 x specLen 31 and bs8 x "
        f"specLen 15) over the full-mask split kernel: mean {v['mean_speedup_pct']:.1f}% faster "
        f"(geomean {v['geomean_speedup_pct']:.1f}%, mean latency cut "
        f"{v['mean_latency_cut_pct']:.1f}%); paper: {PAPER_VERIFY_PCT}% over PFA (compute-only)",
    ]
    print("\n" + "\n".join(summary))
    (args.out / "summary.txt").write_text("\n".join(summary) + "\n")
    if not args.no_plot:
        peak_tflops = chip.peak_flops(args.dtype) / 1e12
        print(f"plot: {plot(args.out, gemm, attention + verify, peak_tflops)}")
    if args.npu_trace is not None:
        specs = [(0, 256)] + [(c, 1) for c in (100, 300, 700, 1500, 3000, 200, 90, 2500)]
        for label, policy in (("xy-serve", LoweringPolicy()), ("baseline", BASELINE_POLICY)):
            tr = time_step("llama-2-7b", specs, chip, block_size=BLOCK_SIZE, policy=policy)
            print(f"trace: {write_perfetto(tr, args.npu_trace / f'step-{label}.json')}")
    print(f"wrote {args.out}/{{gemm,attention,verify,decode}}.csv, summary.txt "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


__all__ = ["main"]
