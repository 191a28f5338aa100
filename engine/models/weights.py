"""Reading a Hugging Face checkpoint's tensors and checking them against the architecture.

`read_weights(dir)` returns every tensor of the checkpoint as fp32 CPU under its HF name
(safetensors, single or sharded, else pytorch_model.bin); `check_weights` verifies that each tensor
the llama-family forward reads is present with the shape the config implies. Both raise
ModelLoadError naming the file or tensor at fault.
"""

from __future__ import annotations

import json
import pathlib

import safetensors.torch
import torch

from engine.arch import ModelArch, ModelLoadError

# Non-parameter buffers some older checkpoints carry; the forward recomputes them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint files of HF directory `path`, safetensors preferred (an index.json lists
    the shards), else pytorch_model.bin (sharded or not). ModelLoadError if there are none."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"cannot read the weight index {index}: {exc}") from exc
            return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not found:
        raise ModelLoadError(f"{path} has no weights (model.safetensors, *.safetensors or "
                             "pytorch_model.bin)")
    return found


def read_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `path`, fp32 on the CPU, under their HF names."""
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise ModelLoadError(f"weights file {file} (listed in the index) is missing")
        try:
            if file.suffix == ".safetensors":
                part = safetensors.torch.load_file(file, device="cpu")
            else:
                # weights_only: a .bin is a pickle, and unpickling arbitrary objects runs code.
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # SafetensorError, UnpicklingError, EOFError, ...: bad file
            raise ModelLoadError(f"cannot read weights file {file} (corrupt or truncated?): "
                                 f"{exc}") from exc
        for name, tensor in part.items():
            if not name.endswith(_IGNORED_SUFFIXES):
                # .float() is a no-op for fp32 tensors and upcasts bf16/fp16 checkpoints.
                weights[name] = tensor.float()
    return weights


def expected_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the forward reads; lm_head.weight only when untied."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if arch.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
            if arch.architecture == "LlamaForCausalLM":
                # Llama's attention_bias also gives o_proj a bias; Qwen2's o_proj has none.
                shapes[p + "self_attn.o_proj.bias"] = (h,)
    return shapes


def check_weights(weights: dict[str, torch.Tensor], arch: ModelArch, path: pathlib.Path) -> None:
    """ModelLoadError unless every tensor of `expected_shapes(arch)` is in `weights` with its
    shape. Extra tensors are allowed (e.g. a tied model's lm_head.weight)."""
    expected = expected_shapes(arch)
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}{more} "
                             f"(config: {arch.architecture}, {arch.num_layers} layers)")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ModelLoadError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, "
                                 f"the config implies {shape}")
