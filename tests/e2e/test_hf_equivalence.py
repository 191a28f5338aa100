"""Greedy tokens of the default model through the simulated NPU == transformers `generate`.

The engine runs every layer as task lists on npu_sim; transformers runs the same fp32 weights
eagerly. Run one prompt at a time, then all together with a small token budget (chunked prefill
mixed with decodes) and a small KV pool (preemption and recompute).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24  # (the prompts are the `prompts` fixture of tests/e2e/conftest.py)
@pytest.fixture(scope="module")
def hf_outputs(default_model_dir, prompts) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir,
                                                              dtype=torch.float32)
    model.eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, attention_mask=torch.ones(1, len(ids)))
            outs.append(out[0, len(ids):].tolist())
    return outs


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)


def test_one_by_one_matches_transformers(prompts, hf_outputs) -> None:
    llm = LLM(dtype="float32", weight_format="fp32")
    for ids, expected in zip(prompts, hf_outputs, strict=True):
        [out] = llm.generate(ids, GREEDY)
        assert out.token_ids == expected, (ids, out.text)


def test_batched_chunked_preempted_matches_transformers(prompts, hf_outputs) -> None:
    longest = max(len(p) for p in prompts)
    budget = 64
    assert longest > budget  # some prompts must be split across steps
    # 48 blocks of 16 tokens = 768 slots: every request fits alone, all of them cannot.
    llm = LLM(dtype="float32", weight_format="fp32", max_num_batched_tokens=budget,
              max_num_seqs=16, block_size=16, num_kv_blocks=48)
    assert sum(len(p) + MAX_NEW_TOKENS for p in prompts) > 48 * 16
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_outputs
    assert llm.engine.scheduler.make_stats().num_preemptions > 0
    assert llm.engine.scheduler.num_free_blocks == 48  # all blocks back in the pool


def test_strict_reference_kernels_match_transformers(prompts, hf_outputs) -> None:
    """The task-by-task reference path gives the same tokens as the fast path (two prompts)."""
    llm = LLM(dtype="float32", weight_format="fp32", strict_kernels=True,
              max_num_batched_tokens=64, block_size=16)
    outs = llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))
    assert [o.token_ids for o in outs] == [h[:4] for h in hf_outputs[:2]]
