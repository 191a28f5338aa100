"""lower_step: a batch of chunks -> one step's kernels (shapes, cached task tables, tile menu)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.arch import ModelArch
from engine.lowering import BASELINE_POLICY, ChunkShape, StepPlan, lower_step
from npu_sim.hardware import KIB, PRESETS, ChipSpec, get_chip
from npu_sim.tasks import GemmKernel, TileShape, VectorKernel, VectorOp
from npu_sim.tiling import ACCUM_BYTES, OPERAND_BYTES, gemm_menu

CHIP = get_chip("910b2")
BLOCK_SIZE = 16

ARCH = ModelArch(
    architecture="Qwen2ForCausalLM",
    num_layers=3,
    hidden_size=96,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=200,
    vocab_size=1000,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    attention_bias=True,
    eos_token_ids=(2,),
    bos_token_id=1,
)


def chunks_of(specs: list[tuple[int, int]]) -> list[ChunkShape]:
    chunks, next_block = [], 0
    for start_pos, num_tokens in specs:
        nb = -(-(start_pos + num_tokens) // BLOCK_SIZE)
        chunks.append(ChunkShape(start_pos, num_tokens, tuple(range(next_block, next_block + nb))))
        next_block += nb
    return chunks


BATCHES = {
    "decodes": ([(5, 1), (40, 1), (16, 1)], 3),
    "mixed": ([(0, 70), (30, 1), (100, 20)], 2),  # the 20-token chunk is a partial prefill
    "prefill_only_unsampled": ([(0, 33), (64, 64)], 0),
    "single_token": ([(0, 1)], 1),
}


def plan_for(name: str, arch: ModelArch = ARCH, chip: ChipSpec = CHIP) -> StepPlan:
    specs, num_sampled = BATCHES[name]
    return lower_step(chunks_of(specs), num_sampled, arch, chip, BLOCK_SIZE)


@pytest.mark.parametrize("name", list(BATCHES))
def test_kernel_shapes(name: str) -> None:
    specs, num_sampled = BATCHES[name]
    t = sum(n for _, n in specs)
    a = ARCH
    h, d, i = a.hidden_size, a.head_dim, a.intermediate_size
    plan = plan_for(name)
    lp = plan.layer
    assert (plan.num_tokens, plan.num_sampled) == (t, num_sampled)
    gemms = {
        "qkv_proj": (lp.qkv_proj, (a.num_heads + 2 * a.num_kv_heads) * d, h),
        "o_proj": (lp.o_proj, h, a.num_heads * d),
        "gate_up_proj": (lp.gate_up_proj, 2 * i, h),
        "down_proj": (lp.down_proj, h, i),
    }
    for gemm_name, (kernel, n, k) in gemms.items():
        assert isinstance(kernel, GemmKernel)
        assert (kernel.name, kernel.m, kernel.n, kernel.k) == (gemm_name, t, n, k)
        assert kernel.menu == gemm_menu(CHIP, kernel.menu[0].tn)  # the menu at its N tile
    assert (lp.qkv_proj.n, lp.gate_up_proj.n) == (10 * 16, 400)
    vectors = {
        plan.embed: (VectorOp.EMBED, t, h),
        plan.first_norm: (VectorOp.RMSNORM, t, h),
        lp.rope: (VectorOp.ROPE, t, (a.num_heads + a.num_kv_heads) * d),
        lp.kv_write: (VectorOp.KV_WRITE, t, 2 * a.num_kv_heads * d),
        lp.post_attn_norm: (VectorOp.ADD_RMSNORM, t, h),
        lp.silu_mul: (VectorOp.SILU_MUL, t, 2 * i),
        lp.next_input_norm: (VectorOp.ADD_RMSNORM, t, h),
        plan.final_norm: (VectorOp.ADD_RMSNORM, num_sampled, h),
    }
    for kernel, (op, rows, row_len) in vectors.items():
        assert isinstance(kernel, VectorKernel)
        assert (kernel.op, kernel.num_rows, kernel.row_len) == (op, rows, row_len), kernel.name
        assert int(kernel.tasks["num_rows"].sum()) == rows
    if num_sampled:
        assert plan.lm_head is not None
        assert (plan.lm_head.m, plan.lm_head.n, plan.lm_head.k) == (num_sampled, a.vocab_size, h)
    else:
        assert plan.lm_head is None
    attn = lp.attention
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.block_size) == (6, 2, 16, 16)
    assert attn.seqs["q_len"].tolist() == [n for _, n in specs]
    assert attn.seqs["start_pos"].tolist() == [p for p, _ in specs]
    assert attn.seqs["q_start"].tolist() == np.cumsum([0] + [n for _, n in specs])[:-1].tolist()


@pytest.mark.parametrize("name", list(BATCHES))
def test_gemm_tasks_cover_each_output(name: str) -> None:
    plan = plan_for(name)
    lp = plan.layer
    kernels = [lp.qkv_proj, lp.o_proj, lp.gate_up_proj, lp.down_proj]
    kernels += [plan.lm_head] if plan.lm_head is not None else []
    for kernel in kernels:
        count = np.zeros((kernel.m, kernel.n), dtype=np.int64)
        for m_start, m_rows, n_start, n_cols, tile, *_ in kernel.tasks.tolist():
            shape = kernel.menu[tile]
            assert m_rows <= shape.tm and n_cols <= shape.tn
            count[m_start : m_start + m_rows, n_start : n_start + n_cols] += 1
        assert (count == 1).all(), kernel.name


def test_task_tables_cached_by_token_count() -> None:
    # same T (3 tokens) from different chunk mixes: the very same GEMM / vector task arrays
    a = lower_step(chunks_of([(5, 1), (40, 1), (16, 1)]), 3, ARCH, CHIP, BLOCK_SIZE)
    b = lower_step(chunks_of([(0, 2), (9, 1)]), 1, ARCH, CHIP, BLOCK_SIZE)
    for name in (
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "rope",
        "kv_write",
        "post_attn_norm",
        "silu_mul",
        "next_input_norm",
    ):
        ta, tb = getattr(a.layer, name).tasks, getattr(b.layer, name).tasks
        assert ta is tb, name
        assert not ta.flags.writeable, f"{name}: a shared cached table must be read-only"
    assert a.embed.tasks is b.embed.tasks
    # different T: different tables (and tasks carry their K range, so o_proj and down_proj,
    # which differ in K only, have tables of their own)
    c = lower_step(chunks_of([(0, 4)]), 1, ARCH, CHIP, BLOCK_SIZE)
    assert c.layer.qkv_proj.tasks is not a.layer.qkv_proj.tasks
    assert (a.layer.o_proj.tasks["k_len"] == a.layer.o_proj.k).all()
    # attention depends on the sequences, not just T
    assert len(a.layer.attention.seqs) == 3 and len(b.layer.attention.seqs) == 2


def test_lm_head_runs_on_sampled_rows_only() -> None:
    plan = plan_for("mixed")  # 91 tokens, 2 sampled
    assert plan.num_tokens == 91
    assert plan.lm_head is not None and plan.lm_head.m == 2
    assert plan.final_norm.num_rows == 2 and int(plan.final_norm.tasks["num_rows"].sum()) == 2
    unsampled = plan_for("prefill_only_unsampled")
    assert unsampled.lm_head is None
    assert unsampled.final_norm.num_rows == 0 and len(unsampled.final_norm.tasks) == 0


def test_verify_chunks_reach_both_attention_policies() -> None:
    """A chunk's draft tree travels through lower_step: the meta kernel gets its tree mask and
    the verify tile, the split baseline runs it in its prefill kernel with a full mask."""
    parents = (-1, 0, 0, 1)
    chunks = chunks_of([(5, 1), (40, 5)])
    chunks[1] = dataclasses.replace(chunks[1], draft_parents=parents)
    attn = lower_step(chunks, 2, ARCH, CHIP, BLOCK_SIZE).layer.attention
    ((seq, mask),) = attn.tree_masks
    assert seq == 1 and mask.tolist() == [[True, False, False, False], [True, True, False, False],
                                          [True, False, True, False], [True, True, False, True]]
    assert set(attn.tasks["tile_rows"][attn.tasks["seq"] == 1].tolist()) == {64}
    baseline = lower_step(chunks, 2, ARCH, CHIP, BLOCK_SIZE, BASELINE_POLICY).layer
    assert baseline.attention.full_mask and baseline.attention.seqs["q_len"].tolist() == [5]
    assert baseline.decode_attention is not None and not baseline.decode_attention.tree_masks
    plain = lower_step(chunks_of([(5, 1), (40, 5)]), 2, ARCH, CHIP, BLOCK_SIZE).layer.attention
    assert plain.tree_masks == () and not plain.full_mask


# ------------------------------------------------------------------------------ tile menu


def test_910b2_menu_largest_tile_is_128x256x64() -> None:
    menu = gemm_menu(CHIP)
    assert menu[0] == TileShape(tm=128, tn=256, tk=64)
    assert [t.tm for t in menu] == [128, 64, 32, 16]


@pytest.mark.parametrize("chip", list(PRESETS.values()), ids=list(PRESETS))
def test_every_tile_fits_the_chip_buffers(chip: ChipSpec) -> None:
    menu = gemm_menu(chip)
    assert menu, "empty menu"
    assert [t.tm for t in menu] == sorted((t.tm for t in menu), reverse=True)
    for t in menu:
        assert t.tm * t.tn * ACCUM_BYTES <= chip.l0c_bytes
        assert 2 * t.tm * t.tk * OPERAND_BYTES <= chip.l0a_bytes
        assert 2 * (t.tm + t.tn) * 256 * OPERAND_BYTES <= chip.l1_bytes
        assert 2 * t.tk * t.tn * OPERAND_BYTES <= chip.l0b_bytes
        assert t.tm % chip.cube_m == 0 and t.tn % chip.cube_n == 0 and t.tk % chip.cube_k == 0
    assert menu[-1].tm == chip.cube_m


@pytest.mark.parametrize(
    "change,largest_tm",
    [
        ({"l0c_bytes": 64 * KIB}, 64),  # tm * 256 * 4 <= 64 KiB
        ({"l0a_bytes": 16 * KIB}, 64),  # 2 * tm * 64 * 2 <= 16 KiB
        ({"l0c_bytes": 256 * KIB}, 256),  # tm * 256 * 4 <= 256 KiB and L0A allows 256
        ({"l1_bytes": 256 * KIB}, 0),  # (tm + 256) 256-deep panels, double-buffered: none fits
    ],
)
def test_menu_follows_the_buffers(change: dict, largest_tm: int) -> None:
    chip = dataclasses.replace(CHIP, name=f"custom{sorted(change.items())}", **change)
    menu = gemm_menu(chip)
    if largest_tm:
        assert menu[0].tm == largest_tm and menu[-1].tm == 16
    else:
        assert menu == () and gemm_menu(chip, 64)[0].tm == 128  # a narrower N tile fits
    plan = lower_step(chunks_of([(0, 300)]), 1, ARCH, chip, BLOCK_SIZE)
    qkv = plan.layer.qkv_proj  # its N tile is the search's; its tiles still fit the buffers
    assert qkv.menu == gemm_menu(chip, qkv.menu[0].tn)
    for t in qkv.menu:
        assert t.tm * t.tn * ACCUM_BYTES <= chip.l0c_bytes  # a narrower tn may take a larger tm
        assert 2 * t.tm * t.tk * OPERAND_BYTES <= chip.l0a_bytes
        assert 2 * (t.tm + t.tn) * 256 * OPERAND_BYTES <= chip.l1_bytes


def test_decode_tiles_match_the_general_tiling() -> None:
    """lower_attention's decode-only shortcut (one tile of attention_q_tile(1, g) rows per
    sequence) gives the tiles the general menu search gives."""
    from engine.lowering_tiles import kv_spans, q_tiles
    from npu_sim.tiling import attention_q_tiles

    chip = get_chip("910b2")
    rng = np.random.default_rng(0)
    for g, num_kv_heads in ((1, 32), (4, 8), (7, 4), (200, 1)):
        for n in (1, 5, 300):
            q_len = np.ones(n, dtype=np.int64)
            start_pos = rng.integers(0, 20000, n)
            verify = np.zeros(n, dtype=bool)
            fast = q_tiles(q_len, start_pos, verify, g, num_kv_heads, chip, 16)
            tile_rows, _ = attention_q_tiles(q_len, g, verify)
            general = kv_spans(np.arange(n), np.zeros(n, np.int64), q_len, tile_rows,
                             start_pos + q_len, g, num_kv_heads, chip, 16)
            for a, b in zip(fast, general, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("tp", [1, 2])
def test_shared_launches_from_the_counts_are_the_steps_own(tp: int) -> None:
    """shared_launch_counts(tokens, sampled rows) is what lower_step_counts shares for any
    chunks with those counts: the same object (cached by its kernels), whichever runs first,
    whatever the chunks' attention."""
    from engine.arch_presets import resolve_arch
    from engine.lowering import lower_step_counts, shared_launch_counts

    arch, chip, block = resolve_arch("llama-3-8b"), get_chip("910b2"), 128

    def chunks(*lengths: tuple[int, int]) -> list[ChunkShape]:
        return [ChunkShape(start, n, tuple(range(-(-(start + n) // block))))
                for start, n in lengths]

    for first_from_counts, batch in ((True, chunks((0, 77), (500, 1), (900, 1))),
                                     (False, chunks((3000, 79), (10, 1)))):
        num_tokens, num_sampled = sum(c.num_tokens for c in batch), len(batch) - 1
        from_counts = shared_launch_counts(num_tokens, num_sampled, arch, chip, block,
                                           arch.num_layers, tp=tp) if first_from_counts else None
        lowered = lower_step_counts(batch, num_sampled, arch, chip, block, arch.num_layers,
                                    tp=tp)[0]
        if from_counts is None:
            from_counts = shared_launch_counts(num_tokens, num_sampled, arch, chip, block,
                                               arch.num_layers, tp=tp)
        first, second = from_counts, lowered
        assert first is second
        assert sum(kernel is None for kernel, _ in first) == 1  # the attention's place
    with pytest.raises(ValueError, match="meta attention only"):
        shared_launch_counts(8, 1, arch, chip, block, arch.num_layers, BASELINE_POLICY)
