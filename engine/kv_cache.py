"""The paged KV cache's bookkeeping: which block ids belong to which request (pure Python).

The cache itself (the K/V tensors, `[num_blocks, block_size, ...]`) lives in the model runner; this
module only hands out block ids. A request's `block_ids` list is its block table: token position
`p` lives in block `block_ids[p // block_size]` at slot `p % block_size`.

Two layers:
- `BlockPool` owns the ids `0 .. num_blocks-1`, a free queue and a ref count per block.
- `KVCacheManager` maps requests onto the pool: grow a request's block table to cover the tokens
  about to be computed (`allocate_slots`), release it (`free`), report `usage`.

NOTE: blocks are ref-counted although today every block has exactly one owner. Prefix caching
(a later issue) shares full blocks between requests with the same prefix: it will add a
content hash per full block, a `hash -> block id` map, and let `allocate` evict the least recently
freed cached block. The free queue is already in LRU order for that (freed blocks go to its tail,
allocation takes from its head), and `incref` is the hook a cache hit will use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.request import Request


class BlockPool:
    """A fixed pool of KV-cache block ids with reference counts.

    Invariant: a block is in the free queue exactly when its ref count is 0.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Head = next to hand out, tail = most recently freed (LRU order for prefix caching).
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        """Owners of `block_id` (0 = free)."""
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks, each with ref count 1.

        All or nothing: returns None, changing nothing, when fewer than `num_blocks` are free.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be non-negative, got {num_blocks}")
        if num_blocks > len(self._free_block_ids):
            return None
        block_ids = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one owner to each of `block_ids`, which must all be in use."""
        for block_id in block_ids:
            # NOTE: prefix caching will allow a hit on a free (ref 0) cached block here, taking
            # it out of the free queue; until then that is a bookkeeping bug.
            assert self._ref_counts[block_id] > 0, f"incref of free block {block_id}"
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each of `block_ids`; a block whose count reaches 0 becomes free.

        Freeing a block that is already free is a bookkeeping bug (AssertionError).
        """
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"double free of block {block_id}"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_block_ids.append(block_id)


class KVCacheManager:
    """Grows and releases requests' block tables on one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use, in [0, 1]."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow `request.block_ids` to cover `num_computed_tokens + num_new_tokens` tokens.

        All or nothing: returns False, changing nothing, when the pool lacks the blocks.
        Never shrinks a block table; `num_computed_tokens` is left for the caller to advance.
        """
        num_needed_tokens = request.num_computed_tokens + num_new_tokens
        num_missing_blocks = self.num_blocks_for(num_needed_tokens) - len(request.block_ids)
        if num_missing_blocks <= 0:
            return True
        new_block_ids = self.pool.allocate(num_missing_blocks)
        if new_block_ids is None:
            return False
        request.block_ids.extend(new_block_ids)
        return True

    def free(self, request: Request) -> None:
        """Release every block of `request` and clear its block table."""
        # NOTE: tail first, so that with prefix caching the blocks least likely to be shared
        # (the end of the sequence) are the first to be evicted.
        self.pool.free(reversed(request.block_ids))
        request.block_ids.clear()
