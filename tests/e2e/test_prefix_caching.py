"""Automatic prefix caching changes what is computed, never what is generated.

Greedy outputs with caching on equal those with caching off, on a tiny model and on the default
one, for prompts that share a long prefix; with caching on, the later prompts hit the cache.
"""

from __future__ import annotations

import pytest
import transformers

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _generate_twice(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """The first prompt alone (fills the cache), then all of them batched, then again."""
    first = llm.generate(prompts[:1], GREEDY)
    batch = llm.generate(prompts, GREEDY)
    again = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in batch] == [o.token_ids for o in again]
    return [first[0].token_ids] + [o.token_ids for o in batch]


def test_tiny_model_outputs_identical_with_and_without_caching(tiny_llama_dir) -> None:
    prefix = [(7 * i) % 900 + 20 for i in range(70)]  # four 16-token blocks and a bit
    prompts = [[*prefix, 1000 + q, 1100 + q, 1200 + q] for q in range(5)]
    prompts.append(prefix[:32])  # ends on a block boundary: its last token is recomputed
    outputs = {}
    for caching in (False, True):
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=16, num_kv_blocks=64,
                  max_num_batched_tokens=64, enable_prefix_caching=caching)
        outputs[caching] = _generate_twice(llm, prompts)
        stats = llm.engine.scheduler.make_stats()
        if caching:
            assert stats.prefix_cache_hits >= 64 * (len(prompts) - 1)
        else:
            assert stats.prefix_cache_hits == 0
        assert llm.engine.scheduler.num_free_blocks == 64
    assert outputs[True] == outputs[False]


@pytest.mark.slow
def test_default_model_outputs_identical_with_and_without_caching(default_model_dir) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    system = ("You are a careful assistant for a public library. Answer in one short sentence. "
              * 12)
    questions = ["When do you open?", "Can I renew a book online?", "Is there parking?"]
    prompts = [tok.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in questions]
    prompts = [list(map(int, p)) for p in prompts]
    assert min(len(p) for p in prompts) > 128  # at least one full default-size block shared
    outputs = {}
    for caching in (False, True):
        llm = LLM(dtype="float32", num_kv_blocks=32, enable_prefix_caching=caching)
        outputs[caching] = _generate_twice(llm, prompts)
        assert (llm.engine.scheduler.make_stats().prefix_cache_hits > 0) == caching
    assert outputs[True] == outputs[False]
