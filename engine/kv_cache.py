"""The paged KV cache's bookkeeping: which block ids belong to which request (pure Python).

The cache itself (the K/V tensors, `[num_blocks, block_size, ...]`) lives in the model runner; this
module only hands out block ids. A request's `block_ids` tuple is its block table: token position
`p` lives in block `block_ids[p // block_size]` at slot `p % block_size`. The tuple is replaced,
never mutated, when the table changes (here only): every step's chunk of the request shares it
(ScheduledChunk.block_ids) instead of copying it, and it grows once per block_size tokens.

Two layers:
- `BlockPool` owns the ids `0 .. num_blocks-1`, a free queue and a ref count per block, and (with
  prefix caching) the content hash of each cached block.
- `KVCacheManager` maps requests onto the pool: find a request's cached prefix
  (`find_cached_prefix`), grow its block table to cover the tokens about to be computed
  (`allocate_slots`), register blocks that became full (`cache_full_blocks`), release it (`free`).

**Automatic prefix caching** (vLLM's APC). A full block is identified by its content: the hash
chain `h_i = sha256(h_{i-1} || tokens of block i)`, so equal hashes mean equal tokens at equal
positions with an equal prefix before them, hence equal K/V. A block is registered in the
`hash -> block id` map once its tokens are computed (after the step that wrote them, so a failed
step never publishes half-written blocks). A new request shares the longest run of cached blocks
at the start of its tokens (ref count + 1 each) and computes only the rest; it never takes its
last known token from the cache, since the step must compute at least one row to sample from.
A freed block keeps its hash: it stays in the free queue (usable) and in the map (reusable) until
`allocate` hands it out again, which evicts it. The free queue is in LRU order (freed blocks go to
its tail, a request's tail blocks first; allocation takes from its head), so eviction takes the
least recently used cached block. Shared blocks are only ever read: a request writes positions
`>= num_computed_tokens`, which lie past every block it took from the cache.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from engine.request import Request
from engine.token_ids import chain_hashes, pack

BlockHash = bytes  # sha256 digest of (parent hash, the block's token ids)

_ROOT_HASH: BlockHash = b"xyserve-prefix-cache-v1"  # the parent of every sequence's first block


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The chained content hash of one full block (parent None = the sequence's first block)."""
    (block_hash,) = hash_blocks(parent, token_ids, len(token_ids))
    return block_hash


def hash_blocks(parent: BlockHash | None, token_ids: Sequence[int], block_size: int,
                packed: bytes | None = None) -> list[BlockHash]:
    """hash_block of each whole block of `token_ids` in turn, each the next one's parent (the
    first's: `parent`): sha256 of the parent and the block's ids as native int64s (the bytes
    `array("q", ids)` holds). The ids are packed all at once (packed: `engine.token_ids.pack`
    of them, where the caller has it) and the blocks hashed in one C call (engine.token_ids):
    prompts are hashed whole."""
    if packed is None:
        packed = pack(token_ids)
    if packed is None:
        raise ValueError("token ids to hash must be integers that fit in 64 bits")
    return chain_hashes(_ROOT_HASH if parent is None else parent, packed, 8 * block_size)


class BlockPool:
    """A fixed pool of KV-cache block ids with reference counts and (optionally) content hashes.

    Invariants: a block is in the free queue exactly when its ref count is 0; a block is in the
    hash map exactly when its `block_hash` is set, and then the map points back at it.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Head = next to hand out (least recently used), tail = most recently freed.
        self._free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}  # hash -> the block holding that content
        self.num_evictions = 0  # cached blocks handed out for new content (cumulative)

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody owns: never used, or cached and evictable."""
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix (owned or free)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        """Owners of `block_id` (0 = free)."""
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The content hash of a cached block, None if it is not cached."""
        return self._block_hashes[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block caching `block_hash`, or None."""
        return self._cached.get(block_hash)

    def free_block_ids(self) -> list[int]:
        """The free queue, head (next evicted) first."""
        return list(self._free_block_ids)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks, each with ref count 1; cached ones among them are
        evicted (their hashes forgotten), least recently used first.

        All or nothing: returns None, changing nothing, when fewer than `num_blocks` are free.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be non-negative, got {num_blocks}")
        free_block_ids = self._free_block_ids
        if num_blocks > len(free_block_ids):
            return None
        # the head of the queue (a prompt takes dozens of blocks at once: one loop, locals)
        block_ids = list(itertools.islice(free_block_ids, num_blocks))
        ref_counts, block_hashes = self._ref_counts, self._block_hashes
        for block_id in block_ids:
            del free_block_ids[block_id]
            ref_counts[block_id] = 1
            if block_hashes[block_id] is not None:  # cached: evicted
                del self._cached[block_hashes[block_id]]
                block_hashes[block_id] = None
                self.num_evictions += 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one owner to each of `block_ids`: blocks in use, or cached free blocks (a prefix
        cache hit, which takes them off the free queue)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                assert self._block_hashes[block_id] is not None, f"incref of free block {block_id}"
                del self._free_block_ids[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each of `block_ids`; a block whose count reaches 0 goes to the tail
        of the free queue (keeping its hash, if cached).

        Freeing a block that is already free is a bookkeeping bug (AssertionError).
        """
        ref_counts, free_block_ids = self._ref_counts, self._free_block_ids
        for block_id in block_ids:
            ref_count = ref_counts[block_id]
            assert ref_count > 0, f"double free of block {block_id}"
            ref_counts[block_id] = ref_count - 1
            if ref_count == 1:
                free_block_ids[block_id] = None

    def cache_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> None:
        """Register each full, computed block of `block_ids` (in use) as holding its hash of
        `block_hashes`, in turn; one whose content another block caches already (two requests
        computed the same block side by side) is left uncached, the first one staying the
        cached copy."""
        ref_counts, cached, hashes = self._ref_counts, self._cached, self._block_hashes
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            assert ref_counts[block_id] > 0, f"caching free block {block_id}"
            if block_hash not in cached:
                assert hashes[block_id] is None, f"block {block_id} is already cached"
                cached[block_hash] = block_id
                hashes[block_id] = block_hash


class KVCacheManager:
    """Grows and releases requests' block tables on one `BlockPool`, sharing cached prefixes
    when `enable_caching`."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        # request id -> hashes of its first full blocks (memo; token ids never change)
        self._hashes: dict[str, list[BlockHash]] = {}
        # request id -> how many of its leading blocks are registered (or came from the cache)
        self._num_registered: dict[str, int] = {}
        self.num_queried_tokens = 0  # tokens of admitted requests looked up (cumulative)
        self.num_hit_tokens = 0  # of those, found in the cache (cumulative)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks in use, in [0, 1] (cached free blocks count as free)."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix caching

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids caching the longest prefix of `request`'s known tokens, in whole blocks and
        never covering its last token (at least one token must be computed to sample).

        Pure lookup: nothing is taken until `allocate_slots(..., cached_block_ids)`. Empty when
        caching is off or the request already holds blocks.
        """
        if not self.enable_caching or request.block_ids:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for block_hash in self._block_hashes(request, max_blocks):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def hash_prompt(self, request: Request, packed_prompt: bytes | None = None) -> None:
        """Hash the whole blocks of a request's prompt as it arrives (vLLM does the same): its
        admission's lookup finds them ready. packed_prompt: `engine.token_ids.pack` of the
        prompt, where the caller has it (the vocabulary check's). A no-op without caching."""
        if not self.enable_caching:
            return
        hashes = self._hashes.setdefault(request.request_id, [])
        if hashes:  # (hashed already)
            return
        hashes += hash_blocks(None, request.prompt_token_ids, self.block_size, packed_prompt)

    def num_cached_blocks(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many of `block_hashes` (a prompt's chained block hashes, first block first) the
        cache holds as a leading run: what `find_cached_prefix` would share (a router asks)."""
        if not self.enable_caching:
            return 0
        num_blocks = 0
        for block_hash in block_hashes:
            if self.pool.lookup(block_hash) is None:
                break
            num_blocks += 1
        return num_blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Register the blocks of `request` that its computed tokens have filled."""
        if not self.enable_caching:
            return
        request_id = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_registered.get(request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        self.pool.cache_blocks(request.block_ids[start:num_full], hashes[start:num_full])
        self._num_registered[request_id] = num_full

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup (the hit-rate counters)."""
        if self.enable_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_hit_tokens

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The chained hashes of the first `num_blocks` blocks of `request` (all full)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        num_hashed = len(hashes)
        if num_hashed < num_blocks:
            tokens = request.token_ids_between(num_hashed * bs, num_blocks * bs)
            hashes += hash_blocks(hashes[-1] if hashes else None, tokens, bs)
        return hashes if num_hashed <= num_blocks else hashes[:num_blocks]

    # ------------------------------------------------------------------ allocation

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_block_ids: Sequence[int] = ()) -> bool:
        """Grow `request.block_ids` to cover `num_computed_tokens + num_new_tokens` tokens.

        `cached_block_ids` (from `find_cached_prefix`, for a request holding no blocks) are
        shared first: the table then covers `len(cached_block_ids) * block_size` cached tokens
        plus `num_new_tokens`, and the caller sets `num_computed_tokens` to the cached count.

        All or nothing: returns False, changing nothing, when the pool lacks the blocks.
        Never shrinks a block table; `num_computed_tokens` is left for the caller to advance.
        """
        if not cached_block_ids:  # the common case (every running request, every step)
            num_missing_blocks = (-(-(request.num_computed_tokens + num_new_tokens)
                                    // self.block_size) - len(request.block_ids))
            if num_missing_blocks <= 0:
                return True
            new_block_ids = self.pool.allocate(num_missing_blocks)  # None when short
            if new_block_ids is None:
                return False
            request.block_ids += tuple(new_block_ids)
            return True
        assert not request.block_ids and request.num_computed_tokens == 0
        num_cached_tokens = len(cached_block_ids) * self.block_size
        num_needed_tokens = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_missing_blocks = (self.num_blocks_for(num_needed_tokens) - len(request.block_ids)
                              - len(cached_block_ids))
        # Cached blocks nobody owns sit in the free queue: sharing them takes them out of it.
        num_revived = sum(self.pool.ref_count(b) == 0 for b in cached_block_ids)
        if max(num_missing_blocks, 0) + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.incref(cached_block_ids)
        self._num_registered[request.request_id] = len(cached_block_ids)
        new_block_ids = self.pool.allocate(max(num_missing_blocks, 0))
        assert new_block_ids is not None
        request.block_ids = (*cached_block_ids, *new_block_ids)
        return True

    def trim(self, request: Request, num_tokens: int) -> None:
        """Release the blocks past the first `num_tokens` tokens (rejected draft tokens' slots).

        Those blocks never held a computed token, so none is registered in the prefix cache.
        """
        keep = self.num_blocks_for(num_tokens)
        if keep < len(request.block_ids):
            assert keep >= self._num_registered.get(request.request_id, 0)
            self.pool.free(reversed(request.block_ids[keep:]))
            request.block_ids = request.block_ids[:keep]

    def free(self, request: Request, preempted: bool = False) -> None:
        """Release every block of `request` and clear its block table (cached blocks stay
        cached until evicted). preempted: it will be admitted again with the same tokens, so
        its block hashes are kept (as vLLM keeps them on the request): its readmission looks
        its prefix up without hashing the sequence again."""
        # Tail first: the blocks least likely to be shared (the end of the sequence) are the
        # first to be evicted.
        self.pool.free(reversed(request.block_ids))
        request.block_ids = ()
        if not preempted:
            self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
