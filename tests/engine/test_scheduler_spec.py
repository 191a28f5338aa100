"""The scheduler's verify stage without a model: verify chunks in the token budget, rollback of
rejected drafts' blocks, adaptive draft length, decodes never starved by a long prefill."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from engine.config import SchedulerConfig, SpeculativeConfig
from engine.outputs import ModelOutput, SchedulerOutput
from engine.request import Request
from engine.scheduler import Scheduler
from engine.spec.types import Draft

# c = 0.25: a single decoding request needs acceptance >= 0.2 per draft position
SPEC = SpeculativeConfig(speculative="ngram", num_speculative_tokens=4, spec_token_cost=0.25)
BLOCK_SIZE = 4


ALWAYS = SpeculativeConfig(speculative="ngram", num_speculative_tokens=4, spec_token_cost=0.0)


def _scheduler(budget: int = 64, num_kv_blocks: int = 64,
               spec: SpeculativeConfig | None = SPEC) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256,
                             mixed_prefill_budget=budget)  # prefills take what verifies leave
    return Scheduler(config, num_kv_blocks, BLOCK_SIZE, 256, speculative=spec)


def _step(scheduler: Scheduler, sampled: Mapping[str, tuple[int, ...]] | None = None,
          drafts: Mapping[str, Draft] | None = None) -> SchedulerOutput:
    """One step: every sampled chunk gets `sampled[id]` (default: one token 7) and, for its next
    step, `drafts[id]` (default: none)."""
    out = scheduler.schedule()
    tokens = {c.request_id: (sampled or {}).get(c.request_id, (7,))
              for c in out.chunks if c.sample}
    scheduler.update_from_output(out, ModelOutput(sampled_token_ids=tokens,
                                                  drafts=dict(drafts or {})))
    return out


def _decoding(scheduler: Scheduler, make_request: Callable[..., Request], request_id: str,
              num_prompt_tokens: int = 6, **kwargs: object) -> Request:
    """Admit a request and run it until it decodes (prompt computed, one token sampled)."""
    request = make_request(request_id, num_prompt_tokens, **kwargs)
    scheduler.add_request(request)
    while request.num_output_tokens == 0:
        _step(scheduler)
    return request


def test_verify_chunk_carries_the_draft_after_the_last_token(make_request) -> None:
    s = _scheduler()
    r = _decoding(s, make_request, "a")
    r.draft = Draft.chain((11, 12, 13))
    [chunk] = s.schedule().chunks
    assert chunk.token_ids == (7, 11, 12, 13) and chunk.draft_parents == (-1, 0, 1)
    assert chunk.start_pos == 6 and chunk.num_known_tokens == 1 and chunk.sample
    assert len(r.block_ids) == 3  # 10 slots of 4: the drafts have slots
    assert r.draft is None  # a draft is verified once


def test_accepted_drafts_advance_and_rejected_slots_are_freed(make_request) -> None:
    s = _scheduler()
    r = _decoding(s, make_request, "a")  # 7 tokens, 6 computed
    _step(s, sampled={"a": (8,)})
    _step(s, drafts={"a": Draft.chain((11, 12, 13, 14, 15))})  # 9 tokens, 8 computed
    free_before = s.num_free_blocks
    out = _step(s, sampled={"a": (11, 12, 9)})  # 2 of 4 drafts accepted (k = 4) + a correction
    assert out.chunks[0].num_tokens == 5 and len(out.chunks[0].block_ids) == 4  # slots 8..12
    assert r.output_token_ids == [7, 8, 7, 11, 12, 9]
    assert r.num_computed_tokens == 11 and r.num_tokens == 12
    assert len(r.block_ids) == 3 and s.num_free_blocks == free_before - 1
    r.draft = Draft.chain((11, 12, 13, 14))
    out = _step(s, sampled={"a": (5,)})  # all rejected: slots 11..15 -> back to 3 blocks
    assert len(out.chunks[0].block_ids) == 4
    assert r.num_computed_tokens == 12 and r.num_tokens == 13
    assert len(r.block_ids) == 4  # slot 12 (the next token's) is in the 4th block


def test_drafts_use_only_the_budget_decodes_leave(make_request) -> None:
    s = _scheduler(budget=6, spec=ALWAYS)
    requests = [_decoding(s, make_request, rid) for rid in "abc"]
    for r in requests:
        r.draft = Draft.chain((11, 12, 13, 14))
    out = s.schedule()
    assert out.num_scheduled_tokens == 6
    assert [c.num_known_tokens for c in out.chunks] == [1, 1, 1]  # every decode kept
    assert [c.num_draft_tokens for c in out.chunks] == [3, 0, 0]


def test_draft_is_cut_to_max_tokens_and_the_tree_stays_a_tree(make_request) -> None:
    s = _scheduler()
    r = _decoding(s, make_request, "a", max_tokens=3)  # 1 output: room for 1 draft + bonus
    r.draft = Draft((11, 12, 13), (-1, -1, 0))
    [chunk] = s.schedule().chunks
    assert chunk.draft_parents == (-1,)


def test_no_speculation_without_a_config(make_request) -> None:
    s = _scheduler(spec=None)
    r = _decoding(s, make_request, "a")
    r.draft = Draft.chain((11, 12))
    assert s.schedule().chunks[0].num_tokens == 1


def test_low_acceptance_stops_drafting_and_a_probe_comes_back(make_request) -> None:
    s = _scheduler()
    r = _decoding(s, make_request, "a", max_tokens=200, ignore_eos=True)
    sizes = []
    for _ in range(60):
        r.draft = Draft.chain((11, 12, 13, 14))
        sizes.append(_step(s).chunks[0].num_draft_tokens)  # every draft rejected
    assert sizes[:5] == [4, 2, 1, 1, 0]  # 0.7 -> 0.49 -> 0.34 -> 0.24 -> 0.17 < 0.2
    probes = sizes[4:]
    assert max(probes) == 1 and 3 <= sum(probes) <= len(probes) // 6


def test_good_acceptance_keeps_full_drafts(make_request) -> None:
    s = _scheduler()
    r = _decoding(s, make_request, "a", max_tokens=200, ignore_eos=True)
    for _ in range(10):
        r.draft = Draft.chain((11, 12, 13, 14))
        out = _step(s, sampled={"a": (11, 12, 13, 14, 15)})
        assert out.chunks[0].num_draft_tokens == 4
    assert r.spec_acceptance > 0.95


def test_verifies_go_before_a_long_prefill(make_request) -> None:
    s = _scheduler(budget=16)
    r = _decoding(s, make_request, "d", num_prompt_tokens=3, max_tokens=50, ignore_eos=True)
    s.add_request(make_request("long", 200, max_tokens=4))
    # Admitted behind d, or (after a preemption and recompute) ahead of it: either way the
    # decode and its drafts are scheduled first and the prefill gets what they leave.
    for step in range(6):
        if step == 3:
            s.running.reverse()
        r.draft = Draft.chain((11, 12))
        out = _step(s, sampled={"d": (11, 12, 13)})
        assert out.chunks[0].request_id == "d" and out.chunks[0].num_tokens == 3
        assert [c.num_tokens for c in out.chunks[1:]] == [13]


def test_preemption_drops_drafts_and_keeps_the_budget(make_request) -> None:
    s = _scheduler(num_kv_blocks=12)
    a = _decoding(s, make_request, "a", num_prompt_tokens=7, max_tokens=40, ignore_eos=True)
    b = _decoding(s, make_request, "b", num_prompt_tokens=7, max_tokens=40, ignore_eos=True)
    for _ in range(8):
        a.draft, b.draft = Draft.chain((11, 12, 13)), Draft.chain((11, 12, 13))
        out = s.schedule()
        assert out.num_scheduled_tokens <= 64
        for c in out.chunks:
            request = s.requests[c.request_id]
            assert len(request.block_ids) * BLOCK_SIZE >= c.context_len
        if out.preempted_ids:
            assert all(s.requests[i].draft is None for i in out.preempted_ids)
        tokens = {c.request_id: (*c.token_ids[c.num_known_tokens:], 7)
                  for c in out.chunks if c.sample}  # every draft accepted
        s.update_from_output(out, ModelOutput(sampled_token_ids=tokens))
    assert s.num_preemptions >= 1
    used = sum(len(r.block_ids) for r in s.requests.values())
    assert used == s.kv_cache.num_blocks - s.num_free_blocks


def test_a_full_batch_speculates_only_on_high_acceptance(make_request) -> None:
    spec = SpeculativeConfig(speculative="ngram", num_speculative_tokens=4,
                             spec_token_cost=0.045)  # thresholds: 4.3% alone, 42% with 16
    config = SchedulerConfig(max_num_batched_tokens=128, max_num_seqs=16, max_model_len=256)

    def drafts(num_requests: int, acceptance: float) -> list[int]:
        s = Scheduler(config, 256, BLOCK_SIZE, 256, speculative=spec)
        requests = [_decoding(s, make_request, f"r{i}", max_tokens=100)
                    for i in range(num_requests)]
        for r in requests:
            r.spec_acceptance, r.draft = acceptance, Draft.chain((11, 12, 13, 14))
        return [c.num_draft_tokens for c in s.schedule().chunks]

    assert drafts(1, 0.4) == [3]  # 0.4 ** 3 = 0.064 >= 0.043 > 0.4 ** 4
    assert drafts(16, 0.4) == [0] * 16  # a full batch: 0.4 < 0.42, nobody drafts
    assert drafts(16, 0.8) == [3] * 16  # 0.8 ** 3 = 0.51 >= 0.42 > 0.8 ** 4
