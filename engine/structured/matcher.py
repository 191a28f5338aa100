"""One request's position in its grammar: the runner's handle on an llguidance matcher.

Masks are bitmasks of int32 words, bit t % 32 of word t // 32 set when token t is allowed
((vocab + 31) // 32 words a row), written straight into the caller's tensor memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from engine.token_tree import node_paths

logger = logging.getLogger("xyserve")


class GrammarMatcher:
    """The tokens a request has generated so far, as its grammar sees them.

    Only the engine thread advances it (`consume`); the mask worker reads it (`fill_masks`)
    while the engine thread runs the model, never while it advances.
    """

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher  # llguidance.LLMatcher, a copy of the compiled grammar's
        self._warned = False

    def fill_masks(self, draft_tokens: Sequence[int], draft_parents: Sequence[int],
                   rows: Any) -> None:
        """Write the allowed tokens after the current position into rows[0] and, for each draft
        node j, after the path to it into rows[1 + j]. A node whose path leaves the grammar
        gets every token allowed: its parent's row rejects it, so its own row is never used.

        rows: (1 + len(draft_tokens), words) int32 tensor, contiguous.
        """
        matcher = self._matcher
        words = rows.shape[1]
        matcher.unsafe_compute_mask_ptr(rows[0].data_ptr(), words * 4)
        if not draft_tokens:
            return
        for j, path in enumerate(node_paths(draft_parents)):
            tokens = [draft_tokens[i] for i in path]
            consumed = matcher.try_consume_tokens(tokens)
            if consumed == len(tokens):
                matcher.unsafe_compute_mask_ptr(rows[1 + j].data_ptr(), words * 4)
            else:
                rows[1 + j].fill_(-1)
            if consumed:
                matcher.rollback(consumed)

    def num_valid(self, token_ids: Sequence[int]) -> int:
        """How many of token_ids, in order, the grammar accepts from here (nothing changes)."""
        return int(self._matcher.validate_tokens(list(token_ids)))

    def valid_nodes(self, draft_tokens: Sequence[int], draft_parents: Sequence[int],
                    ) -> list[bool]:
        """Per draft node: whether the path to it stays in the grammar."""
        return [self.num_valid([draft_tokens[i] for i in path]) == len(path)
                for path in node_paths(draft_parents)]

    def consume(self, token_ids: Sequence[int]) -> None:
        """Advance past tokens the engine sampled (under this grammar's masks, so they fit).
        Once the grammar is complete, the EOS that follows is not consumed: there is nothing
        left to match."""
        matcher = self._matcher
        if matcher.is_stopped():
            return
        if not matcher.consume_tokens(list(token_ids)) and not self._warned \
                and not matcher.is_stopped():
            # Cannot happen for tokens sampled under its masks; if it does, the request goes on
            # unconstrained rather than failing (its masks then allow everything).
            self._warned = True
            logger.warning("grammar matcher refused sampled tokens: %s",
                           matcher.get_error().strip().splitlines()[0][:200])

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more but EOS."""
        return bool(self._matcher.is_stopped())
