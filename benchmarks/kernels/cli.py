"""`xyserve kernels`: the paper's kernel comparisons (the sweep, the default) and single-kernel
timing.

    xyserve kernels [sweep] [--quick] [--out DIR] ...   SmoothGEMM / Meta-Attention vs baselines
    xyserve kernels gemm --m M --n N --k K [--json]     one GEMM (benchmarks.kernels.single)
    xyserve kernels attention --query-lens ... [--json] one attention launch
"""

from __future__ import annotations

SINGLE = ("gemm", "attention")


def main(argv: list[str]) -> int:
    """Dispatch on the first argument: gemm / attention, or the sweep (`sweep` or anything
    else: the sweep's own options, as before subcommands existed)."""
    if argv[:1] and argv[0] in SINGLE:
        from benchmarks.kernels.single import main as single_main

        return single_main(argv)
    from benchmarks.kernels.sweeps import main as sweeps_main

    return sweeps_main(argv[1:] if argv[:1] == ["sweep"] else argv)
