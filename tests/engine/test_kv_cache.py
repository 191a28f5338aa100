"""BlockPool and KVCacheManager: allocation is all or nothing, ref counts, block tables."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine.kv_cache import BlockPool, KVCacheManager
from engine.request import Request

# ---------------------------------------------------------------- BlockPool


def test_pool_starts_all_free() -> None:
    pool = BlockPool(5)
    assert pool.num_blocks == 5
    assert pool.num_free_blocks == 5
    assert pool.num_used_blocks == 0
    assert [pool.ref_count(b) for b in range(5)] == [0, 0, 0, 0, 0]


def test_pool_rejects_empty() -> None:
    with pytest.raises(ValueError, match="num_blocks must be at least 1, got 0"):
        BlockPool(0)


def test_allocate_hands_out_distinct_ids_in_order_with_ref_one() -> None:
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free_blocks == 0
    assert [pool.ref_count(b) for b in range(5)] == [1, 1, 1, 1, 1]


def test_allocate_is_all_or_nothing() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None
    assert pool.num_free_blocks == 1  # the failed call took nothing
    assert pool.allocate(1) == [3]


def test_allocate_zero_is_empty() -> None:
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 2


def test_free_returns_blocks_to_the_tail_of_the_queue() -> None:
    pool = BlockPool(4)
    pool.allocate(4)
    pool.free([2])
    pool.free([0])
    assert pool.num_free_blocks == 2
    # Least recently freed first (the LRU order prefix caching will evict in).
    assert pool.allocate(1) == [2]
    assert pool.allocate(1) == [0]


def test_double_free_is_a_bug() -> None:
    pool = BlockPool(2)
    (block_id,) = pool.allocate(1) or []
    pool.free([block_id])
    with pytest.raises(AssertionError, match="double free of block 0"):
        pool.free([block_id])


def test_free_of_never_allocated_block_is_a_bug() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.free([1])


def test_incref_keeps_block_until_last_owner_frees() -> None:
    pool = BlockPool(3)
    block_ids = pool.allocate(2) or []
    pool.incref(block_ids)
    assert [pool.ref_count(b) for b in block_ids] == [2, 2]
    pool.free(block_ids)
    assert [pool.ref_count(b) for b in block_ids] == [1, 1]
    assert pool.num_free_blocks == 1
    pool.free(block_ids)
    assert pool.num_free_blocks == 3


def test_incref_of_free_block_is_a_bug() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError, match="incref of free block 1"):
        pool.incref([1])


# ---------------------------------------------------------------- KVCacheManager


@pytest.mark.parametrize(
    ("num_tokens", "num_blocks"), [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (33, 3)]
)
def test_num_blocks_for_rounds_up(num_tokens: int, num_blocks: int) -> None:
    assert KVCacheManager(num_blocks=8, block_size=16).num_blocks_for(num_tokens) == num_blocks


def test_allocate_slots_grows_block_table_only_when_needed(
    make_request: Callable[..., Request],
) -> None:
    kv = KVCacheManager(num_blocks=8, block_size=16)
    request = make_request("a", 20)
    assert kv.allocate_slots(request, 20)
    assert request.block_ids == (0, 1)
    request.num_computed_tokens = 20
    assert kv.allocate_slots(request, 12)  # 32 tokens still fit in 2 blocks
    assert request.block_ids == (0, 1)
    request.num_computed_tokens = 32
    assert kv.allocate_slots(request, 1)  # token 33 opens block 3
    assert request.block_ids == (0, 1, 2)
    assert kv.num_free_blocks == 5
    assert request.num_computed_tokens == 32  # the caller advances it, not the manager


def test_allocate_slots_failure_changes_nothing(make_request: Callable[..., Request]) -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    request = make_request("a", 4)
    assert kv.allocate_slots(request, 4)
    request.num_computed_tokens = 4
    assert not kv.allocate_slots(request, 9)  # needs 4 blocks in all, the pool has 3
    assert request.block_ids == (0,)
    assert kv.num_free_blocks == 2
    assert kv.allocate_slots(request, 8)  # exactly the pool
    assert request.block_ids == (0, 1, 2)
    assert kv.num_free_blocks == 0


def test_free_releases_blocks_and_clears_table(make_request: Callable[..., Request]) -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", 8), make_request("b", 4)
    assert kv.allocate_slots(a, 8) and kv.allocate_slots(b, 4)
    assert kv.usage == 0.75
    kv.free(a)
    assert a.block_ids == ()
    assert kv.num_free_blocks == 3
    assert kv.usage == 0.25
    kv.free(b)
    assert kv.usage == 0.0
    assert kv.num_free_blocks == 4


def test_usage_full_pool(make_request: Callable[..., Request]) -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert kv.allocate_slots(make_request("a", 8), 8)
    assert kv.usage == 1.0
    assert kv.num_free_blocks == 0
