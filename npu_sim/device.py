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
        if isinstance(kernel, GemmKernel):
            run = run_gemm
            num_tasks = len(kernel.tasks)
        elif isinstance(kernel, AttentionKernel):
            run = run_attention
            num_tasks = len(kernel.tasks) + len(kernel.combine_tasks)
        elif isinstance(kernel, VectorKernel):
            run = run_vector
            num_tasks = len(kernel.tasks)
        else:
            raise TypeError(f"not a kernel: {type(kernel).__name__}")
        self.num_launches[kernel.primitive] += 1
        self.num_tasks[kernel.primitive] += num_tasks
        return run(kernel, self.strict, **operands)
