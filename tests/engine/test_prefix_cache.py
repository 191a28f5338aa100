"""Automatic prefix caching: content hashes, shared blocks with ref counts, LRU eviction, hits.

Pure scheduler and cache tests (no model): a "KV cache" here is a table of which token each slot
holds, written by the chunks each step schedules, so a hit on wrong or overwritten blocks shows.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import Counter
from collections.abc import Callable

import pytest

from engine import kv_cache
from engine.kv_cache import BlockPool, KVCacheManager, hash_block, hash_blocks
from engine.outputs import ModelOutput, SchedulerOutput
from engine.request import FinishReason, Request
from engine.scheduler import Scheduler
from engine.token_ids import pack

MakeRequest = Callable[..., Request]
MakeScheduler = Callable[..., Scheduler]
RunStep = Callable[..., tuple[SchedulerOutput, list]]

BS = 4  # block size of these tests


def _request(make_request: MakeRequest, request_id: str, tokens: list[int],
             max_tokens: int = 4) -> Request:
    return make_request(request_id, len(tokens), max_tokens, ignore_eos=True,
                        prompt_token_ids=list(tokens))


def _run_to_completion(scheduler: Scheduler, run_step: RunStep) -> None:
    while scheduler.has_unfinished_requests():
        run_step(scheduler)


# ---------------------------------------------------------------- hashes and the pool


def test_hash_chain_depends_on_tokens_and_parent() -> None:
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(a, [5, 6, 7, 8]) == hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_hash_is_sha256_of_the_parent_and_int64_ids() -> None:
    """The packed ids are the bytes of an int64 array: hashes stay what they were (routers and
    other engines compare them)."""
    rng = random.Random(0)
    parent = None
    for num_tokens in (1, 4, 16, 128):
        ids = [rng.randrange(-2**63, 2**63) for _ in range(num_tokens)]
        expected = hashlib.sha256(b"xyserve-prefix-cache-v1" if parent is None else parent)
        expected.update(array("q", ids).tobytes())
        assert hash_block(parent, ids) == expected.digest()
        assert hash_block(parent, tuple(ids)) == expected.digest()
        parent = expected.digest()


def test_blocks_hashed_together_chain_as_one_by_one() -> None:
    """hash_blocks: each whole block's hash_block, chained; a partial last block is left out."""
    rng = random.Random(1)
    ids = [rng.randrange(-2**63, 2**63) for _ in range(16 * 5 + 7)]
    for parent in (None, hash_block(None, [9, 9])):
        expected, chained = [], parent
        for i in range(5):
            chained = hash_block(chained, ids[16 * i:16 * (i + 1)])
            expected.append(chained)
        assert hash_blocks(parent, ids, 16) == expected
        assert hash_blocks(parent, ids[:16 * 5], 16) == expected
        assert hash_blocks(parent, ids[:15], 16) == []


def test_freed_cached_block_stays_reusable_until_evicted() -> None:
    pool = BlockPool(3)
    [b] = pool.allocate(1) or []
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_blocks([b], [h])
    pool.free([b])
    assert pool.num_free_blocks == 3 and pool.lookup(h) == b  # free, yet still cached
    pool.incref([b])  # a hit revives it
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 2 and b not in pool.free_block_ids()
    pool.free([b])
    pool.allocate(3)  # needs every block: the cached one is evicted
    assert pool.lookup(h) is None and pool.block_hash(b) is None and pool.num_evictions == 1


def test_duplicate_content_keeps_the_first_cached_copy() -> None:
    pool = BlockPool(2)
    b0, b1 = pool.allocate(2) or []
    h = hash_block(None, [9, 9, 9, 9])
    pool.cache_blocks([b0, b1], [h, h])
    assert pool.lookup(h) == b0 and pool.block_hash(b1) is None


def test_eviction_is_least_recently_used() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4) or []
    hashes = [hash_block(None, [i] * BS) for i in range(4)]
    pool.cache_blocks(blocks, hashes)
    for b in (blocks[2], blocks[0], blocks[3], blocks[1]):  # freed in this order
        pool.free([b])
    pool.incref([blocks[2]])  # used again: now the most recent once freed
    pool.free([blocks[2]])
    assert pool.free_block_ids() == [blocks[0], blocks[3], blocks[1], blocks[2]]
    assert pool.allocate(2) == [blocks[0], blocks[3]]  # the two least recently used go first
    assert pool.lookup(hashes[0]) is None and pool.lookup(hashes[3]) is None
    assert pool.lookup(hashes[1]) == blocks[1] and pool.lookup(hashes[2]) == blocks[2]


def test_manager_frees_tail_blocks_first(make_request: MakeRequest) -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)
    request = _request(make_request, "a", list(range(100, 112)))
    assert kv.allocate_slots(request, 12)
    request.num_computed_tokens = 12
    kv.cache_full_blocks(request)
    table = list(request.block_ids)
    kv.free(request)
    # the end of a sequence is the least likely to be shared: evicted first
    assert kv.pool.free_block_ids()[-3:] == table[::-1]


def test_prompts_hashed_on_arrival_are_the_hashes_found_later(make_request: MakeRequest) -> None:
    """hash_prompt (at arrival, from the check's packed ids or not) gives the very hashes a
    lookup computes itself, and the lookup finds the blocks another request cached."""
    tokens = list(range(100, 100 + 5 * BS + 3))
    expected = hash_blocks(None, tokens, BS)
    for packed in (None, pack(tokens)):
        kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
        first = _request(make_request, "a", tokens)
        assert kv.allocate_slots(first, len(tokens))
        first.num_computed_tokens = len(tokens)
        kv.cache_full_blocks(first)
        second = _request(make_request, "b", tokens)
        kv.hash_prompt(second, packed)
        assert kv._hashes["b"] == expected
        assert kv.find_cached_prefix(second) == list(first.block_ids[:5])
        kv.free(second)  # (it held nothing: its hashes go all the same)
        assert "b" not in kv._hashes


def test_preempted_request_keeps_its_hashes(make_request: MakeRequest,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A preempted request's tokens are the same when it comes back: its block hashes are kept
    (a finished one's go), so its readmission finds its cached blocks without hashing its
    sequence again."""
    tokens = list(range(100, 100 + 3 * BS + 1))
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    request = _request(make_request, "a", tokens)
    kv.hash_prompt(request)
    assert kv.allocate_slots(request, len(tokens))
    request.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(request)
    blocks = request.block_ids
    kv.free(request, preempted=True)
    request.num_computed_tokens = 0

    def no_hashing(*args: object) -> None:
        raise AssertionError("hashed again")

    monkeypatch.setattr(kv_cache, "hash_blocks", no_hashing)
    monkeypatch.setattr(kv_cache, "hash_block", no_hashing)
    assert kv.find_cached_prefix(request) == list(blocks[:3])
    kv.free(request)
    assert "a" not in kv._hashes


# ---------------------------------------------------------------- the scheduler with caching


def test_second_request_reuses_the_cached_prefix(make_scheduler: MakeScheduler,
                                                 make_request: MakeRequest,
                                                 run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=BS, enable_prefix_caching=True)
    shared = list(range(100, 108))  # two full blocks
    a = _request(make_request, "a", [*shared, 1000, 1001])
    scheduler.add_request(a)
    run_step(scheduler)
    a_blocks = list(a.block_ids)
    b = _request(make_request, "b", [*shared, 2000, 2001, 2002])
    scheduler.add_request(b)
    out, _ = run_step(scheduler)
    [chunk_b] = [c for c in out.chunks if c.request_id == "b"]
    assert chunk_b.start_pos == 8 and chunk_b.num_tokens == 3  # only the new tokens computed
    assert chunk_b.block_ids[:2] == tuple(a_blocks[:2])
    assert chunk_b.block_ids[2] not in a_blocks
    assert [scheduler.kv_cache.pool.ref_count(x) for x in a_blocks[:2]] == [2, 2]
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 11, 8)
    _run_to_completion(scheduler, run_step)
    assert scheduler.num_free_blocks == scheduler.kv_cache.num_blocks


def test_hit_never_covers_the_last_prompt_token(make_scheduler: MakeScheduler,
                                                make_request: MakeRequest,
                                                run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=BS, enable_prefix_caching=True)
    prompt = list(range(100, 108))  # exactly two blocks
    scheduler.add_request(_request(make_request, "a", prompt, max_tokens=1))
    _run_to_completion(scheduler, run_step)
    scheduler.add_request(_request(make_request, "b", prompt, max_tokens=1))
    out, updates = run_step(scheduler)
    # both blocks are cached, but the last token must be computed to sample: one block is hit
    assert (out.chunks[0].start_pos, out.chunks[0].num_tokens, out.chunks[0].sample) == (4, 4, True)
    assert updates[0].new_token_ids
    assert scheduler.make_stats().prefix_cache_hits == 4


def test_generated_tokens_are_cached_too(make_scheduler: MakeScheduler, make_request: MakeRequest,
                                         run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=BS, enable_prefix_caching=True)
    a = _request(make_request, "a", [100, 101, 102], max_tokens=6)
    scheduler.add_request(a)
    _run_to_completion(scheduler, run_step)  # 3 prompt + 6 sampled 7s; 8 tokens computed
    follow_up = [100, 101, 102, 7, 7, 7, 7, 7, 7, 555]  # a chat's next turn
    b = _request(make_request, "b", follow_up)
    scheduler.add_request(b)
    out, _ = run_step(scheduler)
    assert out.chunks[0].start_pos == 8


def test_caching_off_shares_nothing(make_scheduler: MakeScheduler, make_request: MakeRequest,
                                    run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=BS)
    prompt = list(range(100, 110))
    scheduler.add_request(_request(make_request, "a", prompt))
    _run_to_completion(scheduler, run_step)
    scheduler.add_request(_request(make_request, "b", prompt))
    out, _ = run_step(scheduler)
    assert out.chunks[0].start_pos == 0
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)


def test_failed_step_publishes_no_blocks(make_scheduler: MakeScheduler, make_request: MakeRequest,
                                         run_step: RunStep) -> None:
    scheduler = make_scheduler(block_size=BS, enable_prefix_caching=True)
    prompt = list(range(100, 110))
    scheduler.add_request(_request(make_request, "a", prompt))
    scheduler.schedule()  # the model fails: no update_from_output, the engine fails the request
    scheduler.finish_requests("a", FinishReason.ERROR)
    scheduler.add_request(_request(make_request, "b", prompt))
    out, _ = run_step(scheduler)
    assert out.chunks[0].start_pos == 0  # nothing half-written was published
    assert scheduler.kv_cache.pool.num_cached_blocks == 2  # b's own blocks, once computed


def test_preempted_request_resumes_from_its_cached_blocks(make_scheduler: MakeScheduler,
                                                          make_request: MakeRequest,
                                                          run_step: RunStep) -> None:
    # 6 blocks: a (12 prompt tokens) and b fill the pool as they decode; b is preempted, then
    # readmitted when a finishes, finding its own prompt blocks still cached.
    scheduler = make_scheduler(block_size=BS, num_kv_blocks=6, max_num_batched_tokens=32,
                               enable_prefix_caching=True)
    a = _request(make_request, "a", list(range(100, 112)), max_tokens=4)
    b = _request(make_request, "b", list(range(200, 208)), max_tokens=6)
    scheduler.add_request(a)
    scheduler.add_request(b)
    preempted = False
    resumed_at = None
    while scheduler.has_unfinished_requests():
        out, _ = run_step(scheduler)
        preempted |= "b" in out.preempted_ids
        for c in out.chunks:
            if preempted and c.request_id == "b" and resumed_at is None:
                resumed_at = c.start_pos
    assert preempted and b.num_preemptions == 1
    assert resumed_at is not None and resumed_at >= 8  # its prompt came back from the cache
    assert scheduler.make_stats().prefix_cache_hits >= 8


# ---------------------------------------------------------------- randomized property test


def _check_pool(scheduler: Scheduler) -> None:
    pool = scheduler.kv_cache.pool
    owners = Counter(b for r in scheduler.running for b in r.block_ids)
    for r in scheduler.waiting:
        assert not r.block_ids
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == owners[b], f"block {b}"
    assert sorted(pool.free_block_ids()) == [b for b in range(pool.num_blocks) if not owners[b]]
    for b in range(pool.num_blocks):
        h = pool.block_hash(b)
        assert h is None or pool.lookup(h) == b


def test_random_workload_never_frees_or_overwrites_a_referenced_block(
        make_scheduler: MakeScheduler, make_request: MakeRequest, run_step: RunStep) -> None:
    """Requests with shared prefixes, preemptions, aborts and evictions, for many steps: every
    slot a chunk writes is in a block only that request holds and nobody cached, and every token a
    chunk attends to (its whole context, cached prefix included) is the right one."""
    rng = random.Random(1234)
    bases = [[rng.randrange(100, 140) for _ in range(24)] for _ in range(3)]
    for trial in range(6):
        scheduler = make_scheduler(block_size=BS, num_kv_blocks=12, max_num_batched_tokens=16,
                                   max_num_seqs=5, max_model_len=64, enable_prefix_caching=True)
        pool = scheduler.kv_cache.pool
        slots: dict[tuple[int, int], int] = {}  # (block, offset) -> token whose K/V it holds
        requests: dict[str, Request] = {}
        next_id = 0
        for _step in range(300):
            if rng.random() < 0.3 and len(scheduler.requests) < 8:
                base = rng.choice(bases)
                tokens = base[:rng.randrange(1, 25)] + [rng.randrange(100, 140)
                                                      for _ in range(rng.randrange(0, 6))]
                request = _request(make_request, f"r{trial}-{next_id}", tokens,
                                   max_tokens=rng.randrange(1, 12))
                next_id += 1
                scheduler.add_request(request)
                requests[request.request_id] = request
            if scheduler.requests and rng.random() < 0.03:
                scheduler.finish_requests(rng.choice(list(scheduler.requests)),
                                          FinishReason.ABORT)
            scheduler_output = scheduler.schedule()
            for chunk in scheduler_output.chunks:
                request = requests[chunk.request_id]
                tokens = request.all_token_ids
                for j, token in enumerate(chunk.token_ids):  # the step writes its K/V
                    pos = chunk.start_pos + j
                    block = chunk.block_ids[pos // BS]
                    assert pool.ref_count(block) == 1, "write into a shared block"
                    assert pool.block_hash(block) is None, "write into a cached block"
                    slots[(block, pos % BS)] = token
                for pos in range(chunk.context_len):  # and attends to its whole context
                    assert slots.get((chunk.block_ids[pos // BS], pos % BS)) == tokens[pos]
            sampled = {c.request_id: rng.randrange(100, 140)
                       for c in scheduler_output.chunks if c.sample}
            scheduler.update_from_output(
                scheduler_output, ModelOutput(sampled_token_ids={k: (v,) for k, v in
                                                                 sampled.items()}))
            _check_pool(scheduler)
        scheduler.finish_requests(list(scheduler.requests), FinishReason.ABORT)
        scheduler.schedule()
        assert pool.num_free_blocks == pool.num_blocks
        stats = scheduler.make_stats()
        assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
        assert pool.num_evictions > 0 and stats.num_preemptions > 0
