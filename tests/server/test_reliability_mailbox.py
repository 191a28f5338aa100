"""The per-request mailbox: a consumer slower than the engine finds one merged delta, not a
queue; nothing follows a finished output; an error waits behind the pending delta."""

from __future__ import annotations

import asyncio

from engine.mailbox import Mailbox
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import FinishReason


def delta(token: int, text: str, finish: FinishReason | None = None,
          logprobs: bool = False) -> RequestOutput:
    lp = (TokenLogprob(token, -1.0, 1),) if logprobs else None
    return RequestOutput("r", (token,), text, lp, finish, 3, token)


def test_deltas_merge_while_the_consumer_is_away() -> None:
    async def run() -> None:
        box = Mailbox()
        for t in range(1, 101):
            box.put(delta(t, f"<{t}>", logprobs=True))
            assert box.depth == 1
        box.put(delta(101, "!", FinishReason.LENGTH, logprobs=True))
        box.put(delta(102, "late"))  # nothing follows a finished output
        merged = await box.get()
        assert isinstance(merged, RequestOutput)
        assert merged.new_token_ids == tuple(range(1, 102))
        assert merged.new_text == "".join(f"<{t}>" for t in range(1, 101)) + "!"
        assert merged.new_logprobs is not None and len(merged.new_logprobs) == 101
        assert merged.finish_reason is FinishReason.LENGTH and merged.num_output_tokens == 101
        assert box.num_merged == 100 and box.depth == 0

    asyncio.run(run())


def test_an_error_waits_behind_the_pending_delta() -> None:
    async def run() -> None:
        box = Mailbox()
        waiter = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        box.put(delta(1, "a"))
        assert (await waiter).new_text == "a"  # type: ignore[union-attr]
        box.put(delta(2, "b"))
        box.put(RuntimeError("engine died"))
        assert box.depth == 2
        assert (await box.get()).new_text == "b"  # type: ignore[union-attr]
        assert isinstance(await box.get(), RuntimeError)

    asyncio.run(run())
