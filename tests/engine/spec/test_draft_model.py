"""The draft-model drafter: its chains against the model's own greedy continuation (computed by
transformers), KV rollback against a fresh drafter, sampled drafts' q rows, block accounting and
the draft's launches inside the device's step trace."""

from __future__ import annotations

import pathlib

import pytest
import torch
import transformers

from engine.models.loader import LoadedModel, load_model
from engine.request import SamplingParams
from engine.spec.draft_model import DraftModelDrafter
from engine.spec.types import DraftRequest
from npu_sim.device import Device
from npu_sim.hardware import get_chip

GREEDY = SamplingParams(temperature=0.0)
BLOCK_SIZE = 16
K = 4  # draft tokens per call


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: pathlib.Path) -> LoadedModel:
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: pathlib.Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, local_files_only=True, dtype=torch.float32).eval()


def make_drafter(loaded: LoadedModel, num_kv_blocks: int = 64, **kwargs: int,
                 ) -> DraftModelDrafter:
    return DraftModelDrafter(loaded, torch.float32, Device(get_chip("910b2")), BLOCK_SIZE,
                             num_kv_blocks, loaded.arch.vocab_size, **kwargs)


def prompt(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode(text)


@torch.no_grad()
def hf_greedy(model: transformers.PreTrainedModel, token_ids: list[int], n: int) -> list[int]:
    """The model's own greedy continuation: n full forwards, no KV cache."""
    ids = list(token_ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(token_ids):]


def test_greedy_chain_is_the_models_own_continuation(loaded, hf_model) -> None:
    drafter = make_drafter(loaded)
    prompts = {"a": prompt(loaded, "The capital of France is"),
               "b": prompt(loaded, "def fibonacci(n):\n    if n < 2:\n        return n\n" * 3)}
    drafts = drafter.propose([DraftRequest(r, ids, GREEDY) for r, ids in prompts.items()], K)
    for r, ids in prompts.items():
        assert drafts[r].is_chain and drafts[r].probs is None
        assert list(drafts[r].token_ids) == hf_greedy(hf_model, ids, K)
    # the cache holds the prompt and the K - 1 drafts fed back
    assert drafter.num_held_tokens("a") == len(prompts["a"]) + K - 1


@pytest.mark.parametrize("num_accepted", [0, 1, 2, K, None])
def test_rollback_matches_a_fresh_drafter(loaded, num_accepted: int | None) -> None:
    """num_accepted drafts then the target's own token; None: the drafts were never verified
    and two plain decode steps ran instead (the divergence lies before the last token)."""
    drafter = make_drafter(loaded)
    ids = prompt(loaded, "Once upon a time, in a land far away, there lived")
    first = drafter.propose([DraftRequest("r", ids, GREEDY)], K).get("r")
    assert first is not None
    if num_accepted is None:
        new_ids = [*ids, next(t for t in (11, 12) if t != first.token_ids[0]), 13]
    else:
        rejected = first.token_ids[num_accepted] if num_accepted < K else -1
        bonus = next(t for t in (11, 12) if t != rejected)  # the target's token, not the draft's
        new_ids = [*ids, *first.token_ids[:num_accepted], bonus]
    again = drafter.propose([DraftRequest("r", new_ids, GREEDY)], K)["r"]
    fresh = make_drafter(loaded).propose([DraftRequest("r", new_ids, GREEDY)], K)["r"]
    assert again.token_ids == fresh.token_ids
    # stale blocks went back: exactly the blocks of the held tokens are in use
    held = drafter.num_held_tokens("r")
    assert held == len(new_ids) + K - 1
    assert drafter.pool.num_used_blocks == -(-held // BLOCK_SIZE)
    # proposing on unchanged tokens recomputes the last one and repeats the draft
    assert drafter.propose([DraftRequest("r", new_ids, GREEDY)], K)["r"] == again


def test_sampled_drafts_carry_their_distribution(loaded, hf_model) -> None:
    drafter = make_drafter(loaded, seed=7)
    ids = prompt(loaded, "Hello, my name is")
    hot = SamplingParams(temperature=0.7)
    drafts = drafter.propose([DraftRequest("s", ids, hot), DraftRequest("g", ids, GREEDY)], K)
    s, g = drafts["s"], drafts["g"]
    assert g.probs is None
    assert s.probs.shape == (K, loaded.arch.vocab_size) and s.probs.dtype == torch.float32
    torch.testing.assert_close(s.probs.sum(dim=1), torch.ones(K))
    assert all(s.probs[i, t] > 0 for i, t in enumerate(s.token_ids))
    # the first q row is softmax(logits / T) of the model's logits after the prompt
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(s.probs[0], (logits / 0.7).softmax(-1), atol=1e-5, rtol=1e-4)
    # q is a temperature-0.7 distribution: sharper than the temperature-1 one
    assert s.probs[0].max() > logits.softmax(-1).max()


def test_blocks_come_back_and_running_out_drops_drafts(loaded) -> None:
    drafter = make_drafter(loaded, num_kv_blocks=3)
    ids = list(range(100, 130))  # 30 tokens + K - 1 drafts = 33 slots = 3 blocks each
    drafts = drafter.propose([DraftRequest("a", ids, GREEDY), DraftRequest("b", ids, GREEDY)], K)
    assert set(drafts) == {"a"}  # b found no blocks: no draft, no error
    assert drafter.num_held_tokens("b") == 0 and drafter.num_free_blocks == 0
    drafter.free(["a", "unknown"])
    assert drafter.num_free_blocks == 3
    again = drafter.propose([DraftRequest("b", ids, GREEDY)], K)
    assert again["b"] == drafts["a"]
    drafter.free(["b"])
    assert drafter.num_free_blocks == 3
    # a sequence that could never fit the pool is skipped without taking blocks
    assert drafter.propose([DraftRequest("c", list(range(100, 150)), GREEDY)], K) == {}
    assert drafter.num_free_blocks == 3


def test_position_limit_shortens_or_skips_drafts(loaded) -> None:
    drafter = make_drafter(loaded)
    max_pos = loaded.arch.max_position_embeddings
    near = [100 + i % 500 for i in range(max_pos - 2)]
    drafts = drafter.propose([DraftRequest("near", near, GREEDY),
                              DraftRequest("full", [*near, 1, 2], GREEDY)], K)
    assert set(drafts) == {"near"} and drafts["near"].num_tokens == 2


def test_catchup_is_chunked_and_short_requests_go_first(loaded) -> None:
    drafter = make_drafter(loaded, max_catchup_tokens=16)
    long_ids = list(range(200, 240))  # 40 tokens: 3 calls of catch-up
    short_ids = list(range(300, 305))
    drafts = drafter.propose([DraftRequest("long", long_ids, GREEDY),
                              DraftRequest("short", short_ids, GREEDY)], K)
    assert set(drafts) == {"short"}  # the short one's 5 tokens fit first; long gets 11
    assert drafter.num_held_tokens("long") == 11
    assert drafter.propose([DraftRequest("long", long_ids, GREEDY)], K) == {}
    assert drafter.num_held_tokens("long") == 27
    drafts = drafter.propose([DraftRequest("long", long_ids, GREEDY)], K)
    fresh = make_drafter(loaded).propose([DraftRequest("long", long_ids, GREEDY)], K)
    assert drafts["long"] == fresh["long"]


def test_draft_launches_land_in_the_open_step(loaded) -> None:
    drafter = make_drafter(loaded)
    device = drafter.device
    ids = prompt(loaded, "The quick brown fox")
    device.begin_step()
    drafter.propose([DraftRequest("r", ids, GREEDY)], K)
    trace = device.end_step()
    # K draft steps (catch-up + K - 1 decodes), each: embed, first norm, per layer 10 launches
    # (the last layer has no next-layer norm), final norm, LM head
    per_step = 2 + 10 * loaded.arch.num_layers - 1 + 2
    assert trace.num_launches == K * per_step
    lm_heads = [k for k in trace.kernels if k.name == "lm_head"]
    assert len(lm_heads) == K and trace.sim_s > 0
    assert all(f"N={loaded.arch.vocab_size}" in k.shape for k in lm_heads)


def test_vocabulary_mismatch_is_refused(loaded) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        DraftModelDrafter(loaded, torch.float32, Device(get_chip("910b2")), BLOCK_SIZE, 8,
                          loaded.arch.vocab_size + 1)
