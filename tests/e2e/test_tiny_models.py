"""Every model source and architecture, end to end on tiny random-weight models.

Greedy tokens of the engine (layers as npu_sim task lists) must equal transformers `generate` on
the same weights, for Llama (tied), Qwen2 (q/k/v biases, untied), Mistral and a GGUF file, with
chunked prefill (budget smaller than the prompts) and small KV blocks.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import LLM, SamplingParams

NEW_TOKENS = 12
PROMPT_LENS = (1, 5, 23, 40, 61)  # several over the 32-token budget


def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.mark.parametrize("source", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_hf_directory_matches_transformers(source: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(source)
    llm = LLM(model=str(model_dir), dtype="float32", weight_format="fp32",
              max_num_batched_tokens=32, block_size=16)
    prompts = _prompts(llm.engine.info.arch.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == _hf_greedy(model_dir, prompts)


def test_gguf_file_matches_its_source(tiny_gguf_path, tiny_llama_dir) -> None:
    llm = LLM(model=str(tiny_gguf_path), dtype="float32", weight_format="fp32", block_size=16)
    prompts = _prompts(llm.engine.info.arch.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == _hf_greedy(tiny_llama_dir, prompts)
