"""The simulated NPU: executes kernel launches (their numbers are real) in launch order.

`Device.launch(kernel, **operands)` runs the kernel's functional implementation, the batched fast
path by default or the task-by-task reference path in strict mode, and counts the launch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from npu_sim.hardware import ChipSpec
from npu_sim.kernels import run_attention, run_gemm, run_vector
from npu_sim.tasks import AttentionKernel, GemmKernel, Kernel, Primitive, VectorKernel


class Device:
    """One simulated chip. Not thread-safe: one engine thread launches on it."""

    def __init__(self, chip: ChipSpec, strict: bool = False) -> None:
        self.chip = chip
        self.strict = strict  # reference (task-by-task) execution instead of the fast path
        self.num_launches: Counter[Primitive] = Counter()  # launches per primitive, ever
        self.num_tasks: Counter[Primitive] = Counter()  # tasks executed per primitive, ever

    def launch(self, kernel: Kernel, **operands: Any) -> torch.Tensor | None:
        """Run `kernel` on `operands` (see npu_sim.kernels for each primitive's operands).

        Returns the kernel's output tensor, or None for kernels that write in place.
        """
        self.num_launches[kernel.primitive] += 1
        if isinstance(kernel, GemmKernel):
            self.num_tasks[Primitive.GEMM] += len(kernel.tasks)
            return run_gemm(kernel, self.strict, **operands)
        if isinstance(kernel, AttentionKernel):
            self.num_tasks[Primitive.ATTENTION] += len(kernel.tasks) + len(kernel.combine_tasks)
            return run_attention(kernel, self.strict, **operands)
        if isinstance(kernel, VectorKernel):
            self.num_tasks[Primitive.VECTOR] += len(kernel.tasks)
            return run_vector(kernel, self.strict, **operands)
        raise TypeError(f"not a kernel: {type(kernel).__name__}")
