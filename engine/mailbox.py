"""A request's mailbox: where the engine thread's outputs wait for the request's consumer.

At most one delta waits: a delta that arrives before the consumer took the previous one is merged
into it (vLLM's RequestOutputCollector), so a consumer slower than the engine (a client reading a
stream slowly) costs one pending delta, never a growing queue. An error that ends the request
waits after it. Used on the event loop only (the engine thread hands items over with
`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from engine.outputs import RequestOutput


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta equal to `earlier` followed by `later` (of the same request)."""
    logprobs = None
    if earlier.new_logprobs is not None or later.new_logprobs is not None:
        logprobs = (earlier.new_logprobs or ()) + (later.new_logprobs or ())
    return replace(later, new_token_ids=earlier.new_token_ids + later.new_token_ids,
                   new_text=earlier.new_text + later.new_text, new_logprobs=logprobs)


class Mailbox:
    """One request's outputs not yet taken by its consumer: at most one delta (later deltas are
    merged into it) and then, possibly, the error that ended the request. Event-loop side only.
    """

    def __init__(self) -> None:
        self._output: RequestOutput | None = None  # pending delta (merged)
        self._error: BaseException | None = None  # pending terminal error
        self._ready = asyncio.Event()
        self.num_merged = 0  # deltas merged into a pending one (the consumer was slower)

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            if self._error is None:
                self._error = item
        elif self._output is None:
            self._output = item
        elif not self._output.finished:  # nothing follows a finished output
            self._output = merge_outputs(self._output, item)
            self.num_merged += 1
        self._ready.set()

    @property
    def depth(self) -> int:
        """Items waiting: 0, 1 (a delta or an error) or 2 (a delta, then an error)."""
        return (self._output is not None) + (self._error is not None)

    async def get(self) -> RequestOutput | BaseException:
        """The pending delta (all deltas since the last get), else the error; waits for one."""
        while self._output is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._output is not None:
            item: RequestOutput | BaseException = self._output
            self._output = None
        else:
            assert self._error is not None
            item = self._error
        return item
