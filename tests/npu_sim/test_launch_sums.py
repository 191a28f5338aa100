"""The simulator's C launch sums (npu_sim.launch_sums, launch_sums.c) are numpy's bit for bit:
an attention launch's LaunchSums from its rows, for batches of decodes around every branch of
numpy's pairwise summation (7, 8, 9, 128, 129 rows ...), for launches with prefill chunks, on
two chips, both operand widths, MHA, GQA and a tensor-parallel shard; a vector launch's
LaunchSums, for task counts around the same branches; a device without the library sums in
numpy and times steps the same."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

import native_build
from engine.arch_presets import resolve_arch
from engine.lowering import ChunkShape, lower_attention
from engine.lowering_tiles import kv_span_blocks
from engine.lowering_tp import shard_arch
from engine.lowering_unsplit import lower_decodes, lower_unsplit
from npu_sim import launch_sums
from npu_sim.cost_attention import UnsplitShape
from npu_sim.cost_attention_launch import (
    LaunchRows,
    decode_rows,
    launch_costs,
    prices_from_lengths,
    unsplit_rows,
)
from npu_sim.device import Device
from npu_sim.hardware import get_chip
from npu_sim.launch_sums import AttentionLaunchSums, mix_launch_sums, vector_launch_sums
from npu_sim.step_sums import LaunchSums
from npu_sim.tasks import CopyOp, VectorKernel, VectorOp
from npu_sim.tiling import vector_tasks

BLOCK = 128
# around numpy's pairwise summation's branches: under 8, one block of 8 lanes and its rest,
# the 128-element leaf, a split in two, several levels
SIZES = (1, 2, 7, 8, 9, 15, 16, 17, 127, 128, 129, 130, 255, 256, 257, 300, 1000)


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    if native_build.loaded(launch_sums._LIBRARY) is None:
        pytest.skip("the simulator's C library cannot be built here")


def _numpy(device: Device, rows: LaunchRows) -> LaunchSums:
    return mix_launch_sums(device.cost_model, launch_costs(device.cost_model, rows))


def _same(native: LaunchSums | None, numpy: LaunchSums) -> None:
    assert native is not None
    assert native.primitive is numpy.primitive and native.primitive_name == numpy.primitive_name
    assert native.seconds == numpy.seconds and native.num_tasks == numpy.num_tasks
    # bit for bit: the same float64 values, zeros' signs included
    assert native.step_sums.tobytes() == numpy.step_sums.tobytes()


def _decodes(rng: random.Random, n: int, longest: int) -> np.ndarray:
    return np.array([rng.randrange(0, longest) for _ in range(n)], dtype=np.int64)


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)])
@pytest.mark.parametrize("chip_name,dtype", [("910b2", "bf16"), ("910b3", "fp32")])
def test_decode_launches_sum_as_numpy_does(model: str, tp: int, chip_name: str,
                                           dtype: str) -> None:
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip(chip_name)
    device = Device(chip, compute=False, dtype=dtype)
    native = AttentionLaunchSums(device.cost_model).native
    rng = random.Random(len(model) * tp)
    checked = 0
    for n in SIZES:
        for longest in (300, 4000, 30000):
            batch = lower_decodes(_decodes(rng, n, longest), arch, chip, BLOCK)
            if batch is None:  # a tile to split: priced from its tables, not its lengths
                continue
            rows = decode_rows(device.cost_model, batch)
            _same(native(rows), _numpy(device, rows))
            checked += 1
    assert checked >= 2 * len(SIZES)


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)])
@pytest.mark.parametrize("chip_name,dtype", [("910b2", "bf16"), ("910b3", "fp32")])
def test_launches_with_prefill_chunks_sum_as_numpy_does(model: str, tp: int, chip_name: str,
                                                        dtype: str) -> None:
    """A mixed step's launch: decodes and prefill chunks (one tile or several, so HBM
    fractions of 1 and below), on both pipelines a prefill launch takes (3 and 4 stages). Its
    prefill tiles' rows are priced in C, the rest read from the decode table, against numpy
    pricing the former through the row memo: the same bits."""
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip(chip_name)
    device = Device(chip, compute=False, dtype=dtype)
    cm, native = device.cost_model, AttentionLaunchSums(device.cost_model).native
    rng = random.Random(5)
    checked, stages = 0, set()
    for n in (0, 1, 9, 60, 200):
        for chunks in (((0, 2048),), ((3000, 512),), ((100, 37),), ((40000, 512),),
                       ((0, 700), (5000, 1), (64, 300)), ((0, 9000),)):
            decodes = [ChunkShape(int(s), 1, tuple(range(-(-(int(s) + 1) // BLOCK))))
                       for s in _decodes(rng, n, 8000)]
            prefills = [ChunkShape(start, num, tuple(range(-(-(start + num) // BLOCK))))
                        for start, num in chunks]
            kernel = lower_attention([*prefills[:1], *decodes, *prefills[1:]], arch, chip, BLOCK)
            if not prices_from_lengths(cm, kernel):
                continue
            rows = unsplit_rows(cm, kernel)
            # (every row read from the memo's table by its keys: it reaches the longest)
            assert rows.prefill is not None and rows.table.shape[1] > int(rows.keys.max())
            _same(native(rows), _numpy(device, rows))
            checked, stages = checked + 1, stages | {rows.stages}
    assert checked >= 15 and stages == {3, 4}


def test_without_the_library_the_device_sums_in_numpy() -> None:
    """Disabled (as without a compiler), the C path declines, and a device sums a decode launch
    the same."""
    arch, chip = resolve_arch("llama-2-7b"), get_chip("910b2")
    batch = lower_decodes(_decodes(random.Random(1), 100, 3000), arch, chip, BLOCK)
    assert batch is not None
    device = Device(chip, compute=False)
    rows = decode_rows(device.cost_model, batch)
    sums = AttentionLaunchSums(device.cost_model)
    with_library = sums(rows)
    with native_build.disabled():
        assert sums.native(rows) is None
        without = sums(rows)
    _same(with_library, without)


def test_the_timing_only_path_loads_no_torch() -> None:
    """The simulator's library is built and loaded without the CPU kernels' package (which
    imports torch): a simulation that computes nothing stays light."""
    code = ("import sys\n"
            "from engine.timing_runner import build_timing_engine\n"
            "import native_build\n"
            "from npu_sim import launch_sums\n"
            "assert native_build.loaded(launch_sums._LIBRARY) is not None\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("llama-3-8b", 1), ("qwen2.5-72b", 4)])
@pytest.mark.parametrize("chip_name,dtype", [("910b2", "bf16"), ("910b3", "fp32")])
def test_a_launch_lowered_from_its_lengths_in_c_sums_as_the_kernel_does(
        model: str, tp: int, chip_name: str, dtype: str) -> None:
    """AttentionLaunchSums.unsplit (the lowering, the pipeline, the rows and the sums in C,
    from the sequences' lengths) against lower_unsplit's kernel priced and summed (decodes
    only: lower_decodes' batch): the same bits, and declined exactly where the lowering
    declines (a tile to split, a chunk of no token)."""
    arch, chip = shard_arch(resolve_arch(model), tp), get_chip(chip_name)
    device = Device(chip, compute=False, dtype=dtype)
    cm, sums = device.cost_model, AttentionLaunchSums(device.cost_model)
    shape = UnsplitShape(arch.num_heads // arch.num_kv_heads, arch.num_kv_heads, arch.head_dim,
                         BLOCK, kv_span_blocks(BLOCK))
    rng = random.Random(len(model) + tp)
    seen: dict[str, int] = {"priced": 0, "split": 0, "declined": 0, "decodes": 0}
    stages = set()
    for trial in range(120):
        lengths = [(rng.randrange(0, rng.choice((300, 8000, 30000))), 1)
                   for _ in range(rng.choice((0, 1, 9, 60, 200)))]
        lengths += [(rng.choice((0, rng.randrange(0, 40000))), rng.randrange(2, 4097))
                    for _ in range(rng.choice((1, 1, 2, 3)))]
        if trial % 10 == 0:
            lengths = [(s, 1) for s, _ in lengths] or [(5, 1)]  # decodes only
        if trial % 20 == 1:
            lengths.append((100, 0))  # a chunk of no token
        if trial % 20 == 2:  # one long context beside a short prompt: over a core's share
            lengths = [(20000, 1), (0, 16)]
        if trial % 20 == 3:  # over the share with just two spans' blocks (9 blocks of 128)
            lengths = [(1100, 1), (0, 2)]
        rng.shuffle(lengths)
        start_pos = np.array([s for s, _ in lengths], dtype=np.int64)
        num_tokens = np.array([n for _, n in lengths], dtype=np.int64)
        chunks = tuple(ChunkShape(s, n, tuple(range(-(-(s + max(n, 1)) // BLOCK))))
                       for s, n in lengths)
        if num_tokens.max() <= 1:  # decodes: said by num_tokens None, 2-stage
            got = sums.unsplit(start_pos, None, shape)
            batch = lower_decodes(start_pos, arch, chip, BLOCK)
            assert (got is None) == (batch is None)
            if got is not None and batch is not None:
                _same(got, _numpy(device, decode_rows(cm, batch)))
                seen["decodes"] += 1
            continue
        got = sums.unsplit(start_pos, num_tokens, shape)
        if 0 in num_tokens:
            assert got is None
            seen["declined"] += 1
            continue
        kernel = lower_unsplit(chunks, start_pos, num_tokens.tolist(), arch, chip, BLOCK)
        if kernel is None:
            assert got is None
            seen["split"] += 1
            continue
        rows = unsplit_rows(cm, kernel)
        assert got is not None
        _same(got, _numpy(device, rows))
        seen["priced"] += 1
        stages.add(rows.stages)
    # (with as many KV heads as cores, no tile's work is ever over a core's share)
    splits = arch.num_kv_heads < chip.num_cube_cores
    assert seen["priced"] >= 60 and bool(seen["split"]) == splits
    assert seen["declined"] >= 6 and seen["decodes"] >= 6
    assert stages == {3, 4}


def test_array_addresses_read_only_or_not_are_their_data() -> None:
    writable = np.arange(5, dtype=np.int64)
    read_only = np.arange(5, dtype=np.int64)
    read_only.flags.writeable = False
    for a in (writable, read_only, np.empty(0, dtype=np.int64)):
        assert launch_sums._address(a) == a.ctypes.data


def test_a_batch_of_no_sequence_is_declined() -> None:
    chip = get_chip("910b2")
    sums = AttentionLaunchSums(Device(chip, compute=False).cost_model)
    shape = UnsplitShape(1, 32, 128, BLOCK, kv_span_blocks(BLOCK))
    none = np.zeros(0, dtype=np.int64)
    assert sums.unsplit(none, None, shape) is None
    assert sums.unsplit(none, none, shape) is None



@pytest.mark.parametrize("chip_name,dtype", [("910b2", "bf16"), ("910b3", "fp32")])
def test_vector_launches_sum_as_their_timings(chip_name: str, dtype: str) -> None:
    """A vector launch of the lowering's table is summed in C (vector_launch_sums) as
    Device.time times it: every LaunchSums field, bit for bit, for every op, rows whose
    tasks number around numpy's pairwise branches (one task per row where a row fills UB), and
    launches bound by the AIVs and by HBM; any other table is declined."""
    chip = get_chip(chip_name)
    device = Device(chip, compute=False, dtype=dtype)
    cm = device.cost_model
    seen = set()
    for op in (*VectorOp, CopyOp.PAD_COPY):
        for row_len in (64, 4096, 22016, 152064):
            for num_rows in (*SIZES, 2048, 4100):
                kernel = VectorKernel(name="v", op=op, num_rows=num_rows, row_len=row_len,
                                      tasks=vector_tasks(num_rows, row_len, chip))
                got, timing = vector_launch_sums(cm, kernel), device.time(kernel)
                assert got is not None
                seen.add((len(kernel.tasks) > 128, timing.bound))
                want = LaunchSums(timing.primitive, timing.primitive_name, timing.seconds,
                                  timing.num_tasks, timing.step_sums)
                for name, x, y in zip(LaunchSums._fields, got, want, strict=True):
                    assert np.array_equal(x, y) if name == "step_sums" else x == y, (
                        op, row_len, num_rows, name)
    assert {bound for _, bound in seen} == {"cores", "hbm"}
    assert {many for many, _ in seen} == {True, False}  # (over 128 tasks: several levels)
    padded = VectorKernel(name="pad", op=CopyOp.PAD_COPY, num_rows=64, row_len=4096,
                          tasks=vector_tasks(64, 4096, chip), valid_rows=50)
    assert vector_launch_sums(cm, padded) is None
