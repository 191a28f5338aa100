"""`xyserve kernels gemm` and `xyserve kernels attention`: one kernel's simulated time.

    xyserve kernels gemm --m 200 --n 12288 --k 4096 [--policy virtual|bucket|atb] [--json]
    xyserve kernels attention --query-lens 1,1,512 --context-lens 900,3000,0 --num-heads 32 \\
        --num-kv-heads 8 --head-size 128 [--policy meta|split] [--num-cores 12] [--json]

Both lower the kernel as the engine does (engine.lowering) and time it on a timing-only Device
of `--npu` in `--npu-dtype`; `--num-cores` restricts the chip to that many AI cores (AICs, with
their AIVs; HBM and L2 stay the chip's). Printed: simulated time (launch overhead included),
TFLOPS of useful work, bytes moved to and from HBM, tasks and waves. `--json` prints one object:
time_us, tflops, hbm_bytes, num_tasks, num_waves (plus what was timed). A policy that launches
several kernels (bucket: a pad copy then the GEMM; split: prefill and decode kernels) reports
their sum; `num_waves` is the sum over launches of ceil(main tasks / cores) (the launches run
one after the other), combine and split-K reduce tasks counted in num_tasks only.
Usage errors exit 2 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from engine.arch_presets import get_arch
from engine.config import DEFAULT_NPU
from engine.lowering import (
    AttentionPolicy,
    GemmPolicy,
    LoweringPolicy,
    lower_attention,
    lower_attention_split,
    lower_gemm,
)
from npu_sim.device import Device
from npu_sim.gemm_tiling import atb_tiling
from npu_sim.hardware import ChipSpec, load_chip
from npu_sim.tasks import NPU_WEIGHT_FORMATS, AttentionKernel, GemmKernel
from npu_sim.trace import KernelTiming

BLOCK_SIZE = 128  # KV-cache block size of the fake block tables (the engine's default)


class UsageError(ValueError):
    """A bad option: printed as one line, exit 2."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--npu", default=DEFAULT_NPU, help="chip preset or JSON / YAML chip file "
                   "(default: %(default)s)")
    p.add_argument("--npu-dtype", default="bf16", choices=("bf16", "fp16"),
                   help="operand dtype (default: %(default)s)")
    p.add_argument("--num-cores", type=int, metavar="N",
                   help="restrict the chip to N AI cores (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xyserve kernels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kernel", required=True, metavar="KERNEL")
    g = sub.add_parser("gemm", help="out[M, N] = x[M, K] @ w[N, K]^T, one GEMM")
    for dim, what in (("m", "rows of x (tokens)"), ("n", "output features"),
                      ("k", "input features (the reduction)")):
        g.add_argument(f"--{dim}", type=int, required=True, help=what)
    g.add_argument("--policy", default="virtual", choices=("virtual", "bucket", "atb"),
                   help="virtual: SmoothGEMM (menu tiles over the real M); bucket: the baseline "
                        "(M padded to a static bucket by a copy kernel, ATB tiling); atb: "
                        "torch.mm (ATB pp_matmul's tiling of the real M, what the calibration "
                        "rows CK1-CK3 ran) (default: %(default)s)")
    g.add_argument("--weights", default="bf16", choices=NPU_WEIGHT_FORMATS,
                   help="w in HBM: bf16, or weight-only w8a16 / w4a16 (integers with group "
                        "scales, widened on the AIVs) (default: %(default)s)")
    _common(g)
    a = sub.add_parser("attention", help="one step's attention over a batch of sequences")
    a.add_argument("--query-lens", required=True, metavar="Q[,Q...]",
                   help="query tokens of each sequence this step (1 = decode)")
    a.add_argument("--context-lens", default="0", metavar="C[,C...]",
                   help="tokens already in each sequence's KV cache before its queries; one "
                        "value applies to every sequence (default: %(default)s)")
    a.add_argument("--model", help="take heads, KV heads and head size from this preset")
    a.add_argument("--num-heads", type=int, default=32, help="query heads (default: 32)")
    a.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default: 8)")
    a.add_argument("--head-size", type=int, default=128, help="head dim (default: 128)")
    a.add_argument("--policy", default="meta", choices=("meta", "split"),
                   help="meta: XY-Serve's meta-kernel; split: separate PFA / IFA-style prefill "
                        "and decode kernels (default: %(default)s)")
    _common(a)
    return parser


def restrict(chip: ChipSpec, num_cores: int | None) -> ChipSpec:
    """`chip` with only `num_cores` AICs (and their AIVs); the shared HBM and L2 unchanged."""
    if num_cores is None:
        return chip
    if not 1 <= num_cores <= chip.num_cube_cores:
        raise UsageError(f"--num-cores must be in [1, {chip.num_cube_cores}] on {chip.name}, "
                         f"got {num_cores}")
    aivs = chip.num_vector_cores // chip.num_cube_cores
    return dataclasses.replace(chip, name=f"{chip.name}/{num_cores}c", num_cube_cores=num_cores,
                               num_vector_cores=aivs * num_cores)


def report(timings: Sequence[KernelTiming], chip: ChipSpec, what: dict[str, Any]) -> dict[str, Any]:
    """The JSON fields of `timings`, launched one after the other."""
    seconds = sum(t.seconds for t in timings)
    waves = 0
    for t in timings:
        if isinstance(t.kernel, GemmKernel | AttentionKernel):  # main tasks on the AICs
            waves += math.ceil(len(t.kernel.tasks) / chip.num_cube_cores)
        else:  # vector kernels (the bucket baseline's pad copy) on the AIVs
            waves += math.ceil(t.num_tasks / chip.num_vector_cores)
    return {**what, "npu": chip.name, "time_us": seconds * 1e6,
            "tflops": sum(t.flops for t in timings) / seconds / 1e12,
            "hbm_bytes": sum(t.hbm_bytes for t in timings),
            "num_tasks": sum(t.num_tasks for t in timings), "num_waves": waves,
            "launches": [{"name": t.name, "shape": t.shape, "time_us": t.seconds * 1e6,
                          "bound": t.bound, "padding_waste": t.padding_waste} for t in timings]}


def time_gemm(args: argparse.Namespace, chip: ChipSpec, device: Device) -> dict[str, Any]:
    m, n, k = args.m, args.n, args.k
    if min(m, n, k) < 1:
        raise UsageError(f"--m, --n and --k must be at least 1, got {m}, {n}, {k}")
    if args.policy == "atb":
        operand_bytes = device.cost_model.bytes
        kernels = [atb_tiling(m, n, k, chip, operand_bytes).kernel("mm", m, n, k, chip)]
    else:
        pad, gemm = lower_gemm("gemm", m, n, k, chip, LoweringPolicy(gemm=GemmPolicy(args.policy)))
        kernels = [kk for kk in (pad, gemm) if kk is not None]
    kernels = [dataclasses.replace(kk, weights=args.weights) if isinstance(kk, GemmKernel)
               else kk for kk in kernels]
    return report([device.time(kk) for kk in kernels], chip,
                  {"kernel": "gemm", "policy": args.policy, "weights": args.weights, "m": m,
                   "n": n, "k": k})


def _lengths(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < minimum for v in values):
        raise UsageError(f"{flag}: every length must be at least {minimum}, got {text!r}")
    return values


def time_attention(args: argparse.Namespace, chip: ChipSpec, device: Device) -> dict[str, Any]:
    from benchmarks.kernels.harness import fake_chunks

    query = _lengths(args.query_lens, "--query-lens", 1)
    context = _lengths(args.context_lens, "--context-lens", 0)
    if len(context) == 1:
        context *= len(query)
    if len(context) != len(query):
        raise UsageError(f"--context-lens has {len(context)} values for {len(query)} sequences")
    if args.model:
        arch = get_arch(args.model)
    else:
        h, kv, d = args.num_heads, args.num_kv_heads, args.head_size
        if min(h, kv, d) < 1 or h % kv or d % 16:
            raise UsageError(f"need heads divisible by KV heads and a head size that is a "
                             f"multiple of 16, got {h} heads, {kv} KV heads, head size {d}")
        arch = dataclasses.replace(get_arch("llama-2-7b"), num_heads=h, num_kv_heads=kv,
                                   head_dim=d, hidden_size=h * d)
    chunks = fake_chunks(list(zip(context, query, strict=True)), BLOCK_SIZE)
    if AttentionPolicy(args.policy) is AttentionPolicy.META:
        kernels = [lower_attention(chunks, arch, chip, BLOCK_SIZE)]
    else:
        kernels = list(lower_attention_split(chunks, arch, chip, BLOCK_SIZE))
    return report([device.time(kk) for kk in kernels], chip,
                  {"kernel": "attention", "policy": args.policy, "num_seqs": len(query),
                   "query_tokens": sum(query), "kv_tokens": sum(query) + sum(context),
                   "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads,
                   "head_size": arch.head_dim})


def _text(r: dict[str, Any]) -> str:
    how = r["policy"] + (f", {r['weights']} weights" if r.get("weights", "bf16") != "bf16" else "")
    lines = [f"{r['kernel']} ({how}) on {r['npu']}: {r['time_us']:.2f} us, "
             f"{r['tflops']:.1f} TFLOPS, {r['hbm_bytes'] / 1e6:.3f} MB HBM, "
             f"{r['num_tasks']} tasks, {r['num_waves']} waves"]
    for launch in r["launches"]:
        lines.append(f"  {launch['name']:<10} {launch['shape']:<44} {launch['time_us']:9.2f} us"
                     f"  {launch['bound']}-bound, padding waste {launch['padding_waste']:.1%}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        chip = restrict(load_chip(args.npu), args.num_cores)
        device = Device(chip, compute=False, dtype=args.npu_dtype)
        result = (time_gemm if args.kernel == "gemm" else time_attention)(args, chip, device)
    except ValueError as exc:  # UsageError, an unknown chip or model
        print(f"xyserve kernels {args.kernel}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else _text(result))
    return 0
