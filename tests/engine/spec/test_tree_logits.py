"""A token tree verified in one pass gives every node the logits its branch gets as a chain.

Through the whole model on the simulated device (tiny random Llama, fp32): the prompt is
prefilled, then a tree of candidates is verified in one chunk (tree mask in the meta-attention,
siblings in separate KV slots, RoPE at root + depth), and each root-to-leaf branch is verified
as a plain causal chain over the same cached prompt.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.outputs import ScheduledChunk, SchedulerOutput
from engine.token_tree import node_paths

BLOCK_SIZE = 16
PROMPT = list(range(1000, 1037))  # 37 tokens: the root sits inside the third block
#            0     1     2     3     4     5     6     7   (node)
TREE = ((501, 502, 503, 601, 602, 701, 603, 504),
        (-1, 0, 1, -1, 3, 0, 4, 2))


@pytest.fixture(scope="module", params=[False, True], ids=["fast", "strict"])
def runner(request: pytest.FixtureRequest, tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=BLOCK_SIZE,
              strict_kernels=request.param)
    return llm.engine.runner


def _logits(runner, start_pos: int, token_ids, parents=()) -> torch.Tensor:
    block_ids = tuple(range(4))
    chunk = ScheduledChunk("r", start_pos, tuple(token_ids), block_ids, sample=True,
                           draft_parents=tuple(parents))
    runner.device.begin_step()
    logits = runner.compute_logits(SchedulerOutput(chunks=(chunk,)))
    runner.device.end_step()
    return logits


def test_tree_rows_equal_their_branches_as_chains(runner) -> None:
    _logits(runner, 0, PROMPT[:-1])  # prefill all but the root: its K/V in blocks 0..2
    root, start = PROMPT[-1], len(PROMPT) - 1
    tokens, parents = TREE
    tree = _logits(runner, start, (root, *tokens), parents)  # (1 + 8, V)
    assert tree.shape[0] == 1 + len(tokens)
    paths = node_paths(parents)
    leaves = [j for j in range(len(tokens)) if j not in parents]
    for leaf in leaves:
        branch = paths[leaf]
        chain = _logits(runner, start, (root, *(tokens[j] for j in branch)),
                        tuple(range(-1, len(branch) - 1)))
        torch.testing.assert_close(chain[0], tree[0], rtol=1e-4, atol=1e-4)  # the root row
        for depth, node in enumerate(branch):
            torch.testing.assert_close(chain[1 + depth], tree[1 + node], rtol=1e-4, atol=1e-4)


def test_without_the_tree_mask_siblings_would_leak(runner) -> None:
    """The same tokens read as one chain give different rows: the mask is what isolates them."""
    _logits(runner, 0, PROMPT[:-1])
    root, start = PROMPT[-1], len(PROMPT) - 1
    tokens, parents = TREE
    tree = _logits(runner, start, (root, *tokens), parents)
    chain = _logits(runner, start, (root, *tokens), tuple(range(-1, len(tokens) - 1)))
    assert not torch.allclose(tree[1 + 3], chain[1 + 3], atol=1e-3)  # node 3 hangs off the root
