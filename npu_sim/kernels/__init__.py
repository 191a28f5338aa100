"""Functional implementations of the primitives: each has a task-by-task reference path
(`strict=True`) and a fast batched path; tests hold them to agreement."""

from npu_sim.kernels.attention import run_attention
from npu_sim.kernels.gemm import (
    WEIGHT_FORMATS,
    PackedWeight,
    pack_quantized,
    pack_weight,
    run_gemm,
)
from npu_sim.kernels.vector import run_vector

__all__ = ["WEIGHT_FORMATS", "PackedWeight", "pack_quantized", "pack_weight", "run_attention",
           "run_gemm", "run_vector"]
