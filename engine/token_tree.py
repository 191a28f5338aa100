"""Token trees of speculative decoding: the one definition the drafters, the scheduler, the
runner and the lowering share (pure Python, a leaf module).

A tree of N draft nodes is its `parents` tuple: node j continues node `parents[j]`, or the root
(the request's last known token) when that is -1. Parents precede children, so the nodes are in
topological order and every prefix of a tree is a tree. A chain of k nodes has parents
(-1, 0, ..., k - 2). Node j sits at position root + depth(j); the lowering gives each node its
own KV slot (root + 1 + j) so siblings never share one.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_parents(parents: Sequence[int]) -> None:
    """Raise ValueError unless every node's parent (-1 = the root) precedes it."""
    for j, parent in enumerate(parents):
        if not -1 <= parent < j:
            raise ValueError(f"draft node {j}'s parent {parent} does not precede it")


def is_chain(parents: Sequence[int]) -> bool:
    """Node j continues node j - 1 for every j (the causal mask is the tree's own)."""
    return all(parent == j - 1 for j, parent in enumerate(parents))


def chain_parents(num_nodes: int) -> tuple[int, ...]:
    """The parents of a chain of num_nodes nodes."""
    return tuple(range(-1, num_nodes - 1))


def node_paths(parents: Sequence[int]) -> list[tuple[int, ...]]:
    """Per node, the node indices from the root's child down to it (its depth is the length)."""
    paths: list[tuple[int, ...]] = []
    for j, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (j,))
    return paths


def node_depths(parents: Sequence[int]) -> list[int]:
    """Per node, its depth below the root (1 for the root's children)."""
    depths: list[int] = []
    for parent in parents:
        depths.append(depths[parent] + 1 if parent >= 0 else 1)
    return depths
