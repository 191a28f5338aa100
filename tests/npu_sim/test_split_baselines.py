"""The split attention baselines as torch-npu's PFA / IFA split work: IFA's flash decoding (KV
spans over the cores, partials joined by combine tasks) or whole (request, KV head) units in
contiguous runs; PFA's blocks cut into runs of equal work per core. Their numbers match the
meta-kernel's, and their costs include the combine (reduction) phase."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.kernels.harness import fake_chunks
from engine.arch import ModelArch
from engine.arch_presets import get_arch
from engine.lowering import lower_attention, lower_attention_split
from npu_sim.device import Device
from npu_sim.hardware import get_chip

B2 = get_chip("910b2")
MHA = ModelArch("LlamaForCausalLM", 2, 64, 4, 4, 16, 128, 1000, 1e-6, 4096, True, False, (2,), 1)
GQA = ModelArch("LlamaForCausalLM", 2, 96, 6, 2, 16, 128, 1000, 1e-6, 4096, True, False, (2,), 1)


def _decode(arch: ModelArch, contexts: list[int], block: int = 16):
    (kernel,) = lower_attention_split(fake_chunks([(c, 1) for c in contexts], block), arch, B2,
                                      block)
    assert kernel.name == "decode_attention" and not kernel.vector_qk
    return kernel


def test_ifa_flash_decodes_a_long_request_over_the_cores() -> None:
    """1 request x 4 KV heads = 4 units < 0.4 x 48 AIV slots, 8000 keys > 1024, MHA: each unit's
    KV in 12 parts (48 / 4; 3000 keys would take 5, the most with >= 512 keys each), joined by
    one combine task per unit."""
    assert set(_decode(MHA, [2999]).combine_tasks["num_slots"].tolist()) == {5}
    kernel = _decode(MHA, [7999])
    assert len(kernel.combine_tasks) == 4
    assert set(kernel.combine_tasks["num_slots"].tolist()) == {12}
    assert len(kernel.tasks) == 48 and (kernel.tasks["partial_slot"] >= 0).all()
    assert len(set(kernel.task_group.tolist())) == 48
    spans = kernel.tasks["kv_block_end"] - kernel.tasks["kv_block_start"]
    assert spans.max() == -(-8000 // 12 // 16) and spans.min() > 0.9 * spans.max()  # equal parts
    timing = Device(B2, compute=False).time(kernel)
    assert timing.block_dim == B2.num_cube_cores
    on_aiv = timing.task_unit == 1  # the combine phase (the reduction) comes after
    assert on_aiv.sum() == 4 and timing.vector_active_cycles > 0


@pytest.mark.parametrize("contexts,why", [
    ([900], "1024 keys or fewer never split (paged KV on the 910B)"),
    ([2999] * 5, "20 units are not under 0.4 x 48"),
])
def test_ifa_keeps_whole_units(contexts: list[int], why: str) -> None:
    kernel = _decode(MHA, contexts)
    assert len(kernel.combine_tasks) == 0 and (kernel.tasks["partial_slot"] < 0).all(), why
    assert len(kernel.tasks) == len(contexts) * MHA.num_kv_heads


def test_ifa_with_gqa_splits_only_past_2048_keys() -> None:
    assert len(_decode(GQA, [1500]).combine_tasks) == 0
    assert len(_decode(GQA, [2500]).combine_tasks) == GQA.num_kv_heads


def test_ifa_cuts_many_units_into_contiguous_runs_of_equal_kv() -> None:
    rng = np.random.default_rng(3)
    contexts = [int(c) for c in rng.integers(50, 4000, 40)]  # 160 units over 48 slots
    kernel = _decode(MHA, contexts)
    groups = kernel.task_group
    assert (np.diff(groups) >= 0).all(), "runs are contiguous in (request, head) order"
    assert len(set(groups.tolist())) == B2.num_vector_cores
    load = np.bincount(groups, weights=np.repeat(np.array(contexts) + 1, MHA.num_kv_heads))
    assert load.max() < 1.5 * load.mean()


def test_pfa_cuts_blocks_into_equal_work_runs_per_core() -> None:
    """One 4k prompt of Llama-2-7B: 32 heads x 32 Q blocks, causal weights 1..32 per head, cut
    into 24 contiguous runs whose weights are within one block's weight of the target."""
    arch = get_arch("llama-2-7b")
    (kernel,) = lower_attention_split(fake_chunks([(0, 4096)], 128), arch, B2, 128)
    assert kernel.name == "prefill_attention" and len(kernel.tasks) == 32 * 32
    groups = kernel.task_group
    assert (np.diff(groups) >= 0).all() and groups.max() == B2.num_cube_cores - 1
    weights = (kernel.tasks["q_offset"] // 128 + 1).astype(float)
    per_core = np.bincount(groups, weights=weights)
    assert np.abs(per_core - weights.sum() / B2.num_cube_cores).max() <= 32
    timing = Device(B2, compute=False).time(kernel)
    busy = timing.cube_busy_cycles
    assert busy.max() < 1.1 * busy.mean()


def test_flash_decode_and_balanced_prefill_compute_the_meta_kernels_numbers() -> None:
    """Long decodes (flash-decoded, partials + combine) and a prompt: the split kernels' rows add
    up to the meta-kernel's output on the reference and the fast path."""
    block = 16
    chunks = fake_chunks([(1500, 1), (40, 30), (2100, 1)], block)
    gen = torch.Generator().manual_seed(7)
    t = 1 + 30 + 1
    nb = sum(len(c.block_ids) for c in chunks)
    q = torch.randn(t, MHA.num_heads, MHA.head_dim, generator=gen)
    kc = torch.randn(nb, block, MHA.num_kv_heads, MHA.head_dim, generator=gen)
    vc = torch.randn(nb, block, MHA.num_kv_heads, MHA.head_dim, generator=gen)
    meta = Device(B2, strict=True).launch(lower_attention(chunks, MHA, B2, block), q=q,
                                          k_cache=kc, v_cache=vc)
    split = lower_attention_split(chunks, MHA, B2, block)
    assert [k.name for k in split] == ["prefill_attention", "decode_attention"]
    assert len(split[1].combine_tasks) > 0, "the long decodes were not flash-decoded"
    for strict in (True, False):
        dev = Device(B2, strict=strict)
        total = sum(dev.launch(k, q=q, k_cache=kc, v_cache=vc) for k in split)
        torch.testing.assert_close(total, meta, atol=1e-5, rtol=1e-5)
