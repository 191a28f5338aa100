"""The meta-kernel lists its distinct task shapes (a tile and KV span, the same work on every KV
head); the cost model prices each shape once. The timing must be the one of pricing every task."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from benchmarks.kernels.harness import fake_chunks
from engine.arch_presets import get_arch
from engine.lowering import lower_attention
from npu_sim.device import Device
from npu_sim.hardware import get_chip

B2 = get_chip("910b2")


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "qwen2.5-7b"])
@pytest.mark.parametrize("seed", range(6))
def test_pricing_shapes_equals_pricing_tasks(model: str, seed: int) -> None:
    rng = random.Random(seed)
    specs = [(rng.choice([0, rng.randint(0, 9000)]), rng.choice([1, 1, rng.randint(1, 3000)]))
             for _ in range(rng.randint(1, 48))]
    kernel = lower_attention(fake_chunks(specs, 128), get_arch(model), B2, 128)
    assert kernel.shapes is not None and kernel.task_shape is not None
    assert len(kernel.shapes) * kernel.num_kv_heads == len(kernel.tasks)
    # every task is its shape on some KV head
    shape_rows = kernel.shapes[kernel.task_shape]
    for field in ("seq", "q_offset", "q_rows", "tile_rows", "kv_block_start", "kv_block_end"):
        assert np.array_equal(shape_rows[field], kernel.tasks[field])
    assert np.array_equal(shape_rows["partial_slot"] < 0, kernel.tasks["partial_slot"] < 0)
    every_task = dataclasses.replace(kernel, shapes=None, task_shape=None)
    a = Device(B2, compute=False).time(kernel)
    b = Device(B2, compute=False).time(every_task)
    for name in ("cycles", "hbm_read_bytes", "hbm_write_bytes", "flops", "cube_macs",
                 "useful_cube_macs", "cube_active_cycles", "vector_active_cycles"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12), name
    assert np.allclose(a.cube_busy_cycles, b.cube_busy_cycles, rtol=1e-12)
