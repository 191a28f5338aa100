"""Builds the drafter a SpeculativeConfig names."""

from __future__ import annotations

import torch

from engine.config import SpeculativeConfig
from engine.spec.types import Drafter
from npu_sim.device import Device


def build_drafter(config: SpeculativeConfig, device: Device, dtype: torch.dtype,
                  block_size: int, num_kv_blocks: int, target_vocab_size: int,
                  seed: int) -> Drafter:
    """The drafter of `config.speculative` (which must be set). A draft model is loaded from
    local files, runs on the target's device and gets a KV pool of `num_kv_blocks` blocks.
    Raises ModelLoadError / ValueError when the draft model cannot serve this target."""
    if config.speculative == "ngram":
        from engine.spec.ngram import NgramDrafter

        return NgramDrafter(config.ngram_min, config.ngram_max)
    if config.speculative == "tree":
        from engine.spec.tree import TreeDrafter

        return TreeDrafter(config.ngram_min, config.ngram_max, config.num_speculative_branches)
    if config.speculative == "draft-model":
        from engine.models.loader import load_model
        from engine.spec.draft_model import DraftModelDrafter

        assert config.draft_model is not None  # SpeculativeConfig checks it
        return DraftModelDrafter(load_model(config.draft_model), dtype, device, block_size,
                                 num_kv_blocks, target_vocab_size, seed)
    raise ValueError(f"no drafter for speculative={config.speculative!r}")
