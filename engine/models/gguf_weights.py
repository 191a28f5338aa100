"""A GGUF model's block-quantized weights as they ship (Q4_1 / Q8_0), under their Hugging Face
names: what `--weight-format gguf` multiplies with, so that a decode step streams the file's 4-
and 8-bit blocks instead of their fp32 dequantization.

The fp32 model the engine otherwise runs *is* that dequantization (transformers' GGUF loader,
engine.models.gguf_convert), so a GEMM on the blocks computes the same products, only summed in
another order. llama.cpp stores the Q and K projections with the rows of each head's two RoPE
halves interleaved; the blocks are taken back into the Hugging Face order (whole rows: a block
never spans rows). Float tensors (norms) and block formats the kernels do not read are left
out: the engine keeps those weights in fp32.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import gguf
import numpy as np

from engine.arch import ModelArch
from engine.models.gguf_convert import cache_key
from engine.models.loader import default_cache_dir
from npu_sim.kernels.quant import QuantizedWeight, unpermute_rows

# The block formats the kernels read, by GGUF type.
_FORMATS = {int(gguf.GGMLQuantizationType.Q4_1): "q4_1",
            int(gguf.GGMLQuantizationType.Q8_0): "q8_0"}


def ships_blocks(gguf_path: pathlib.Path) -> bool:
    """Whether the file holds any matrix in a block format the kernels read (Q4_1 / Q8_0)."""
    return any(entry[0] in _FORMATS for entry in _index(gguf_path).values())


def read_quantized(gguf_path: pathlib.Path, arch: ModelArch) -> dict[str, QuantizedWeight]:
    """HF state-dict name -> the weight's blocks (views of the memory-mapped file), for every
    Q4_1 / Q8_0 matrix of the file."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, arch.num_layers)
    data = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    out: dict[str, QuantizedWeight] = {}
    for hf_name in _hf_matrix_names(arch):
        entry = _index(gguf_path).get(names.get_name(hf_name, try_suffixes=(".weight",)) or "")
        if entry is None or entry[0] not in _FORMATS or len(entry[3]) != 2:
            continue  # absent (tied LM head), or a float tensor: the fp32 copy serves
        kind, offset, num_bytes, shape = entry
        n, k = shape[1], shape[0]  # GGUF lists the fastest dimension first
        blocks = data[offset:offset + num_bytes].reshape(n, -1)
        weight = QuantizedWeight(_FORMATS[kind], (n, k), blocks)
        if hf_name.endswith("q_proj.weight"):
            weight = weight.take_rows(unpermute_rows(n, arch.num_heads))
        elif hf_name.endswith("k_proj.weight"):
            weight = weight.take_rows(unpermute_rows(n, arch.num_kv_heads))
        out[hf_name] = weight
    return out


def _index(gguf_path: pathlib.Path) -> dict[str, Any]:
    """GGUF tensor name -> [type, absolute data offset, bytes, shape], read once per file with
    gguf's reader (seconds: it parses all the metadata, the tokenizer's included) and kept in
    the cache directory beside the converted models."""
    cached = default_cache_dir() / "gguf-index" / f"{cache_key(gguf_path)}.json"
    try:
        index: dict[str, Any] = json.loads(cached.read_text())
        return index
    except (OSError, ValueError):
        pass
    index = {t.name: [int(t.tensor_type), int(t.data_offset), int(t.n_bytes),
                      [int(d) for d in t.shape]] for t in gguf.GGUFReader(gguf_path).tensors}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(index))
        tmp.replace(cached)
    except OSError:
        pass  # read again next time
    return index


def _hf_matrix_names(arch: ModelArch) -> list[str]:
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names
