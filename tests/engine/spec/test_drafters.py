"""The prompt-lookup drafters: exact proposals on hand-made tokens, tree shape, and properties."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine.request import SamplingParams
from engine.spec.ngram import NgramDrafter
from engine.spec.tree import TreeDrafter
from engine.spec.types import Draft, DraftRequest, JoinedTokens


def _req(tokens: Sequence[int], request_id: str = "r") -> DraftRequest:
    return DraftRequest(request_id, list(tokens), SamplingParams())


def _ngram(tokens: Sequence[int], ngram_min: int, ngram_max: int, k: int) -> list[int] | None:
    draft = NgramDrafter(ngram_min, ngram_max).propose([_req(tokens)], k).get("r")
    if draft is None:
        return None
    assert draft.is_chain and draft.probs is None
    return list(draft.token_ids)


def _reference_ngram(
    tokens: Sequence[int], ngram_min: int, ngram_max: int, k: int
) -> list[int] | None:
    """Brute force: n from ngram_max down, the latest occurrence ending before the last token."""
    length = len(tokens)
    for n in range(ngram_max, ngram_min - 1, -1):
        suffix = list(tokens[length - n :]) if n <= length else None
        for end in range(length - 2, n - 2, -1):
            if suffix is not None and list(tokens[end - n + 1 : end + 1]) == suffix:
                return list(tokens[end + 1 : end + 1 + k])
    return None


def _paths(draft: Draft) -> list[list[int]]:
    """Root-to-node token path of every node."""
    paths: list[list[int]] = []
    for token, parent in zip(draft.token_ids, draft.parents, strict=True):
        paths.append(([] if parent < 0 else paths[parent]) + [token])
    return paths


def _depths(draft: Draft) -> list[int]:
    return [len(path) for path in _paths(draft)]


# ----------------------------------------------------------------------------- ngram


def test_latest_occurrence_wins() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 4, 9, 5, 1, 2]
    assert _ngram(tokens, 2, 2, 3) == [4, 9, 5]


def test_longest_n_first() -> None:
    tokens = [7, 1, 2, 3, 3, 5, 1, 2, 4, 4, 7, 1, 2]
    assert _ngram(tokens, 1, 3, 2) == [3, 3]  # the 3-gram 7 1 2 beats the later 2-gram 1 2
    assert _ngram(tokens, 1, 2, 2) == [4, 4]  # ngram_max caps n: the latest 2-gram wins


def test_ngram_min_respected() -> None:
    tokens = [5, 2, 8, 6, 2]  # only the 1-gram `2` recurs
    assert _ngram(tokens, 1, 3, 2) == [8, 6]
    assert _ngram(tokens, 2, 3, 2) is None


def test_suffix_does_not_match_itself() -> None:
    assert _ngram([1, 2, 3], 1, 3, 4) is None
    assert _ngram([4], 1, 1, 4) is None
    assert _ngram([], 1, 1, 4) is None
    assert _ngram([5, 5], 1, 2, 4) == [5]  # the earlier 5; the 2-gram has no earlier copy


def test_fewer_tokens_than_max_at_the_end() -> None:
    assert _ngram([1, 2, 3, 1, 2], 2, 2, 5) == [3, 1, 2]
    assert _ngram([1, 1, 1, 1], 2, 2, 5) == [1]  # overlapping occurrence ending at index 2
    assert _ngram([1, 2, 1, 2, 1], 3, 3, 5) == [2, 1]  # `1 2 1` at 0..2 overlaps the suffix


def test_no_match_means_no_entry_and_batches_are_independent() -> None:
    drafter = NgramDrafter(1, 2)
    drafts = drafter.propose([_req([1, 2, 3], "a"), _req([3, 4, 3], "b"), _req([9, 9], "c")], 2)
    assert set(drafts) == {"b", "c"}
    assert drafts["b"] == Draft.chain([4, 3])
    assert drafts["c"] == Draft.chain([9])
    assert drafter.propose([_req([3, 4, 3], "b")], 0) == {}


def test_rejects_bad_ngram_bounds() -> None:
    with pytest.raises(ValueError):
        NgramDrafter(0, 2)
    with pytest.raises(ValueError):
        NgramDrafter(3, 2)
    with pytest.raises(ValueError):
        TreeDrafter(1, 2, 0)


@pytest.mark.parametrize("drafter_type", [NgramDrafter, TreeDrafter])
def test_incremental_history_and_free(drafter_type: type) -> None:
    drafter = NgramDrafter(1, 3) if drafter_type is NgramDrafter else TreeDrafter(1, 3, 3)
    rng = random.Random(1)
    tokens = [rng.randrange(4) for _ in range(300)]
    for length in (1, 2, 50, 51, 52, 300):  # grow, as outputs are appended
        fresh = type(drafter)(*_args(drafter))
        assert drafter.propose([_req(tokens[:length])], 4) == fresh.propose(
            [_req(tokens[:length])], 4
        )
    assert drafter.num_requests == 1
    # an id reused with other tokens (or a shorter sequence) is rebuilt, not extended
    other = [3, 0, 1, 3, 0, 2, 3, 0]
    assert drafter.propose([_req(other)], 4) == type(drafter)(*_args(drafter)).propose(
        [_req(other)], 4
    )
    drafter.free(["r", "unknown"])
    assert drafter.num_requests == 0


def _args(drafter: NgramDrafter | TreeDrafter) -> tuple[int, ...]:
    if isinstance(drafter, TreeDrafter):
        return drafter.ngram_min, drafter.ngram_max, drafter.num_branches
    return drafter.ngram_min, drafter.ngram_max


def test_ngram_matches_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(400):
        ngram_min = rng.randint(1, 3)
        ngram_max = rng.randint(ngram_min, 5)
        k = rng.randint(1, 6)
        tokens = [rng.randrange(rng.choice((2, 3, 6))) for _ in range(rng.randint(0, 40))]
        assert _ngram(tokens, ngram_min, ngram_max, k) == _reference_ngram(
            tokens, ngram_min, ngram_max, k
        ), (tokens, ngram_min, ngram_max, k)


# ----------------------------------------------------------------------------- tree


def _tree(
    tokens: Sequence[int], ngram_min: int, ngram_max: int, branches: int, k: int
) -> Draft | None:
    return TreeDrafter(ngram_min, ngram_max, branches).propose([_req(tokens)], k).get("r")


def test_tree_merges_shared_prefixes() -> None:
    tokens = [9, 1, 2, 9, 1, 3, 9]  # `9` is followed by 1 3 9 (latest), then by 1 2 9
    assert _tree(tokens, 1, 1, 2, 5) == Draft((1, 3, 9, 2, 9), (-1, 0, 1, 0, 3))
    assert _tree(tokens, 1, 1, 2, 4) == Draft((1, 3, 9, 2), (-1, 0, 1, 0))


def test_tree_counts_distinct_branches_only() -> None:
    # `9` is followed by 1 3 5 9, 1 2 5 9 1, 1 2 5 9 1 again (no branch), 4 9 1 2 5
    tokens = [9, 4, 9, 1, 2, 5, 9, 1, 2, 5, 9, 1, 3, 5, 9]
    assert _tree(tokens, 1, 1, 2, 5) == Draft((1, 3, 5, 2, 9), (-1, 0, 1, 0, 2))
    assert _tree(tokens, 1, 1, 3, 5) == Draft((1, 3, 5, 2, 4), (-1, 0, 1, 0, -1))
    # `2 2` is followed by 3 2 2 (latest), 2 3 2 2; then `2` by 2 (a prefix: skipped), 2 2 3 2
    tokens = [2, 2, 2, 3, 2, 2]
    assert _tree(tokens, 1, 2, 3, 10) == Draft(
        (3, 2, 2, 2, 3, 2, 2, 2, 3, 2), (-1, 0, -1, 1, 2, 4, 2, 5, 6, 8)
    )


def test_tree_budget_ranks_depth_plus_branch() -> None:
    # `0` is followed by 7 7 7 7 (latest), 8 8 8 8, 9 9 9 9: three disjoint branches
    tokens = [0, 9, 9, 9, 9, 0, 8, 8, 8, 8, 0, 7, 7, 7, 7, 0]
    draft = _tree(tokens, 1, 1, 3, 4)
    assert draft == Draft((7, 7, 8, 7), (-1, 0, -1, 1))  # depths 3, 1, 0
    draft = _tree(tokens, 1, 1, 3, 9)
    assert draft is not None and draft.num_tokens == 9
    assert draft.token_ids == (7, 7, 8, 7, 8, 9, 7, 8, 9)  # ranked (d + r, r)
    # truncation keeps a tree, and the same nodes the smaller budget picks
    for n in range(1, 10):
        assert draft.truncate(n) == _tree(tokens, 1, 1, 3, n)


def test_tree_short_best_branch_leaves_depth_to_others() -> None:
    tokens = [3, 5, 6, 7, 8, 3, 4, 3]  # latest `3` is followed only by `4 3`
    assert _tree(tokens, 1, 1, 2, 4) == Draft((4, 3, 5, 6), (-1, 0, -1, 2))


def test_tree_with_one_branch_is_the_ngram_chain() -> None:
    rng = random.Random(3)
    for _ in range(200):
        tokens = [rng.randrange(3) for _ in range(rng.randint(0, 30))]
        k = rng.randint(1, 6)
        expected = NgramDrafter(1, 3).propose([_req(tokens)], k).get("r")
        assert _tree(tokens, 1, 3, 1, k) == expected


def test_tree_paths_really_follow_a_suffix_ngram() -> None:
    rng = random.Random(11)
    for _ in range(300):
        ngram_min = rng.randint(1, 2)
        ngram_max = rng.randint(ngram_min, 4)
        branches = rng.randint(1, 5)
        k = rng.randint(1, 10)
        tokens = [rng.randrange(rng.choice((2, 3, 5))) for _ in range(rng.randint(0, 60))]
        draft = _tree(tokens, ngram_min, ngram_max, branches, k)
        chain = _reference_ngram(tokens, ngram_min, ngram_max, k)
        if draft is None:
            assert chain is None
            continue
        assert chain is not None and draft.num_tokens <= k
        paths = _paths(draft)
        assert len({tuple(p) for p in paths}) == len(paths)  # shared prefixes are shared nodes
        leaves = set(range(draft.num_tokens)) - set(draft.parents)
        assert len(leaves) <= branches
        for path in paths:
            assert _follows_a_suffix_ngram(tokens, path, ngram_min, ngram_max), (tokens, path)
        # the best branch is as deep as any other, unless it ran out of tokens
        assert paths[0] == chain[:1]
        deepest = max(len(p) for p in paths)
        assert chain[:deepest] in paths or len(chain) < deepest
        for n in range(draft.num_tokens + 1):
            assert _paths(draft.truncate(n)) == paths[:n]


def _follows_a_suffix_ngram(
    tokens: Sequence[int], path: list[int], ngram_min: int, ngram_max: int
) -> bool:
    length = len(tokens)
    for n in range(ngram_min, min(ngram_max, length) + 1):
        for end in range(n - 1, length - 1):
            if (
                tokens[end - n + 1 : end + 1] == tokens[length - n :]
                and tokens[end + 1 : end + 1 + len(path)] == path
            ):
                return True
    return False


def test_joined_tokens_read_as_one_list() -> None:
    parts = ([1, 2, 3], [4, 5], (), (6,))
    joined, flat = JoinedTokens(*parts), [1, 2, 3, 4, 5, 6]
    assert len(joined) == 6 and list(joined) == flat
    assert [joined[i] for i in range(-6, 6)] == flat[-6:] + flat
    for a in range(-7, 8):
        for b in range(-7, 8):
            assert joined[a:b] == flat[a:b]
    assert joined[::2] == flat[::2]
    with pytest.raises(IndexError):
        joined[6]
