"""LlamaModel.rope_tables: transformers' rotary cos / sin, bit for bit, from tables it grows."""

from __future__ import annotations

import pathlib

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from engine.models.llama import LlamaModel
from engine.models.loader import load_model
from npu_sim.device import Device
from npu_sim.hardware import get_chip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_are_transformers_rotary_embedding(tiny_llama_dir: pathlib.Path,
                                                       dtype: torch.dtype) -> None:
    loaded = load_model(str(tiny_llama_dir))
    model = LlamaModel(loaded, dtype, Device(get_chip("910b2")))
    rotary = LlamaRotaryEmbedding(transformers.AutoConfig.from_pretrained(tiny_llama_dir))
    generator = torch.Generator().manual_seed(0)
    # a decode step's few rows, a prefill chunk's run, then positions past the tables so far
    # (they grow), then small ones again (read from the grown tables)
    for positions in (torch.tensor([5, 0, 17]), torch.arange(40, 1100),
                      torch.randint(0, 5000, (64,), generator=generator), torch.tensor([3])):
        cos, sin = model.rope_tables(positions)
        ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None])
        assert cos.dtype == sin.dtype == dtype
        assert torch.equal(cos, ref_cos[0].to(dtype)) and torch.equal(sin, ref_sin[0].to(dtype))
    assert len(model.rope_tables(torch.tensor([], dtype=torch.int64))[0]) == 0
