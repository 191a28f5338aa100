"""What the scheduler cuts out of a request: chunks of its tokens, and when it stops."""

from __future__ import annotations

from engine.outputs import ScheduledChunk
from engine.request import FinishReason, Request
from engine.spec.types import Draft


def make_chunk(request: Request, num_new_tokens: int, draft: Draft | None = None,
               ) -> ScheduledChunk:
    """The next num_new_tokens of `request` from its computed ones (then `draft`'s nodes)."""
    start_pos = request.num_computed_tokens
    end_pos = start_pos + num_new_tokens
    token_ids = request.token_ids_between(start_pos, end_pos)
    if draft is None:
        return ScheduledChunk(request.request_id, start_pos, token_ids, request.block_ids,
                              end_pos == request.num_tokens)
    return ScheduledChunk(request.request_id, start_pos, token_ids + draft.token_ids,
                          request.block_ids, end_pos == request.num_tokens, draft.parents)


def append_sampled(request: Request, sampled: tuple[int, ...], max_model_len: int,
                   ) -> tuple[tuple[int, ...], FinishReason | None]:
    """Append `sampled` to `request`'s outputs up to the first that stops it; returns the
    tokens appended and why it stopped (None: it goes on)."""
    output_token_ids = request.output_token_ids
    if len(sampled) == 1:  # a decode: no slicing, no loop
        output_token_ids.append(sampled[0])
        return sampled, check_stop(request, max_model_len)
    for i, token_id in enumerate(sampled):
        output_token_ids.append(token_id)
        finish_reason = check_stop(request, max_model_len)
        if finish_reason is not None:
            return sampled[:i + 1], finish_reason  # tokens after a stop are dropped
    return sampled, None


def check_stop(request: Request, max_model_len: int) -> FinishReason | None:
    """Why `request` stops after its newest output token, or None to go on.

    Order: EOS and stop token ids (both gated by min_tokens, which counts output tokens), then
    max_tokens, then max_model_len. A stop token is kept in `output_token_ids`.
    """
    # Called per sampled token: lengths read once, no property calls, and most tokens of a
    # request come before any rule could stop it (`first_stop_output_len`).
    output_ids = request.output_token_ids
    num_output_tokens = len(output_ids)
    if num_output_tokens < request.first_stop_output_len:
        return None
    params = request.sampling_params
    if num_output_tokens >= params.min_tokens:
        last_token_id = output_ids[-1]
        if ((last_token_id == request.eos_token_id and not params.ignore_eos)
                or last_token_id in params.stop_token_ids):
            return FinishReason.STOP
    max_tokens = params.max_tokens
    if max_tokens is not None and num_output_tokens >= max_tokens:
        return FinishReason.LENGTH
    if len(request.prompt_token_ids) + num_output_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def first_stop_output_len(request: Request, max_model_len: int) -> int:
    """The fewest output tokens at which `check_stop` could stop `request`: before that no
    token can (none stops it before min_tokens, or none at all without EOS and stop token
    ids), nor can max_tokens or max_model_len."""
    params = request.sampling_params
    num_max_output_tokens = max_model_len - len(request.prompt_token_ids)
    if params.max_tokens is not None:
        num_max_output_tokens = min(num_max_output_tokens, params.max_tokens)
    stops_on_tokens = ((request.eos_token_id is not None and not params.ignore_eos)
                       or bool(params.stop_token_ids))
    if stops_on_tokens:
        return min(params.min_tokens, num_max_output_tokens)
    return num_max_output_tokens
