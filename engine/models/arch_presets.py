"""Shapes of public models (configs only, no weights) and a helper that times a whole model step
on the simulated NPU in timing-only mode, for models too large to run on this CPU.

Shapes are those of each model's `config.json` on the Hugging Face hub (the repository named
next to each preset; read from the published configs, not downloaded here). Only what lowering
and timing need matters (layers, widths, heads, vocabulary); the rest is filled in faithfully.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.lowering import DEFAULT_POLICY, ChunkShape, LoweringPolicy, lower_step, step_launches
from engine.models.arch import ModelArch
from npu_sim.device import Device
from npu_sim.hardware import DEFAULT_CHIP, ChipSpec, get_chip
from npu_sim.trace import StepTrace


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int,
           max_pos: int, eos: tuple[int, ...], bos: int) -> ModelArch:
    return ModelArch(
        architecture="LlamaForCausalLM", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=inter, vocab_size=vocab, rms_norm_eps=1e-5,
        max_position_embeddings=max_pos, tie_word_embeddings=False, attention_bias=False,
        eos_token_ids=eos, bos_token_id=bos)


def _qwen2(layers: int, hidden: int, heads: int, kv_heads: int, inter: int) -> ModelArch:
    return ModelArch(
        architecture="Qwen2ForCausalLM", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=inter, vocab_size=152064, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
        eos_token_ids=(151643,), bos_token_id=None)


ARCH_PRESETS: dict[str, ModelArch] = {
    # meta-llama/Llama-2-7b-hf: MHA, 32 x 4096, intermediate 11008
    "llama-2-7b": _llama(32, 4096, 32, 32, 11008, 32000, 4096, (2,), 1),
    # meta-llama/Llama-2-13b-hf
    "llama-2-13b": _llama(40, 5120, 40, 40, 13824, 32000, 4096, (2,), 1),
    # meta-llama/Llama-2-70b-hf: GQA with 8 KV heads
    "llama-2-70b": _llama(80, 8192, 64, 8, 28672, 32000, 4096, (2,), 1),
    # meta-llama/Meta-Llama-3-8B: GQA 32/8, intermediate 14336, vocab 128256
    "llama-3-8b": _llama(32, 4096, 32, 8, 14336, 128256, 8192, (128001,), 128000),
    # meta-llama/Meta-Llama-3-70B
    "llama-3-70b": _llama(80, 8192, 64, 8, 28672, 128256, 8192, (128001,), 128000),
    # Qwen/Qwen2.5-7B: 28 x 3584, GQA 28/4, intermediate 18944, q/k/v biases
    "qwen2.5-7b": _qwen2(28, 3584, 28, 4, 18944),
    # Qwen/Qwen2.5-72B: 80 x 8192, GQA 64/8, intermediate 29568
    "qwen2.5-72b": _qwen2(80, 8192, 64, 8, 29568),
}


def get_arch(name: str) -> ModelArch:
    """The preset called `name` (case-insensitive); ValueError listing the presets otherwise."""
    try:
        return ARCH_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCH_PRESETS)}") from None


def fake_chunks(specs: Sequence[tuple[int, int]], block_size: int) -> list[ChunkShape]:
    """ChunkShapes for (start_pos, num_tokens) pairs, with disjoint consecutive block tables."""
    chunks, next_block = [], 0
    for start_pos, num_tokens in specs:
        n = -(-(start_pos + num_tokens) // block_size)
        chunks.append(ChunkShape(start_pos, num_tokens, tuple(range(next_block, next_block + n))))
        next_block += n
    return chunks


def time_step(arch: ModelArch | str, specs: Sequence[tuple[int, int]],
              chip: ChipSpec | str = DEFAULT_CHIP, *, block_size: int = 128,
              num_sampled: int | None = None, policy: LoweringPolicy = DEFAULT_POLICY,
              device: Device | None = None, dtype: str = "bf16", tp: int = 1) -> StepTrace:
    """Lower and time one step of `arch` on (start_pos, num_tokens) chunks, timing only.

    Every chunk samples unless `num_sampled` says how many do. The launches are the forward's
    (engine.lowering.step_launches), made on `device` (a fresh timing-only one by default); with
    `tp` > 1 they are one card's of a tensor-parallel group, collectives included.
    """
    arch = get_arch(arch) if isinstance(arch, str) else arch
    chip = get_chip(chip) if isinstance(chip, str) else chip
    device = device or Device(chip, compute=False, dtype=dtype)
    chunks = fake_chunks(specs, block_size)
    plan = lower_step(chunks, len(chunks) if num_sampled is None else num_sampled, arch,
                      device.chip, block_size, policy, tp)
    device.begin_step()
    for kernel in step_launches(plan, arch.num_layers):
        device.launch(kernel)
    return device.end_step(num_requests=len(chunks))
