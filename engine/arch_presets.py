"""Shapes of public models (configs only, no weights): what the timing-only engine (`xyserve
simulate`) and the kernel sweeps lower, for models too large to run on this CPU.

Shapes are those of each model's `config.json` on the Hugging Face hub (the repository named
next to each preset; read from the published configs, not downloaded here). Only what lowering
and timing need matters (layers, widths, heads, vocabulary); the rest is filled in faithfully.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from engine.arch import SUPPORTED_ARCHITECTURES, ModelArch, ModelLoadError


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
    # Qwen/Qwen3-8B: 36 x 4096, GQA 32/8, head 128, intermediate 12288, no q/k/v biases; its
    # per-head q/k RMSNorms (two small vector ops a layer) are left out of the lowering
    "qwen3-8b": ModelArch(
        architecture="Qwen3ForCausalLM", num_layers=36, hidden_size=4096, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
        rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
        attention_bias=False, eos_token_ids=(151645,), bos_token_id=None),
}


def get_arch(name: str) -> ModelArch:
    """The preset called `name` (case-insensitive); ValueError listing the presets otherwise."""
    try:
        return ARCH_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCH_PRESETS)}") from None


# Architectures whose shape the timing-only engine lowers like a Llama decoder (Qwen3's q/k
# norms ignored, as for the preset); weights are never read, so nothing else matters.
TIMING_ARCHITECTURES = frozenset({*SUPPORTED_ARCHITECTURES.values(), "Qwen3ForCausalLM"})
_CONFIG_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
                    "hidden_act": "silu"}


def resolve_arch(model: str) -> ModelArch:
    """A model's shape without its weights: a preset name, or a Hugging Face `config.json` (the
    file, or a directory holding one). Raises ModelLoadError naming the file and the problem."""
    if model.lower() in ARCH_PRESETS:
        return ARCH_PRESETS[model.lower()]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"unknown model {model!r}: not a preset ({', '.join(ARCH_PRESETS)})"
                             f" nor a config.json or a directory holding one")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read a model config: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: a model config is a JSON object")
    listed = data.get("architectures") or []
    if listed and listed[0] in TIMING_ARCHITECTURES - set(SUPPORTED_ARCHITECTURES.values()):
        data = {**data, "architectures": ["LlamaForCausalLM"]}  # shaped like one
    config = SimpleNamespace(**(_CONFIG_DEFAULTS | data))
    try:
        arch = ModelArch.from_hf_config(config)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return replace(arch, architecture=listed[0]) if listed else arch
