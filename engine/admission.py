"""Whether a request can ever run in an engine: its lengths against max_model_len and the whole
KV pool. The one place these are checked (the server's 400s for them come from here, through
RequestRejected's param and code); pure Python, as the scheduler that calls it."""

from __future__ import annotations

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestRejected


def check_fits(request: Request, max_model_len: int, kv_cache: KVCacheManager) -> None:
    """Raise RequestRejected unless `request` can run: a non-empty prompt that leaves room to
    generate within max_model_len, prompt + max_tokens (and min_tokens) within it, and its
    longest possible sequence within the whole KV pool. The one place these lengths are checked:
    the server's 400s come from here."""
    num_prompt_tokens = request.num_prompt_tokens
    params = request.sampling_params
    if num_prompt_tokens == 0:
        raise RequestRejected("the prompt is empty (0 tokens)", param="prompt")
    if num_prompt_tokens >= max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens: the prompt has "
            f"{num_prompt_tokens} tokens, max_model_len is {max_model_len}, which leaves no room "
            f"to generate. Please reduce the length of the prompt.",
            param="prompt", code="context_length_exceeded")
    max_num_tokens = request.max_num_tokens
    if max_num_tokens is not None and max_num_tokens > max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens: the prompt has "
            f"{num_prompt_tokens} tokens and max_tokens is {params.max_tokens}, together more "
            f"than max_model_len {max_model_len}. Please reduce the length of the prompt or of "
            f"the completion.", param="max_tokens", code="context_length_exceeded")
    if num_prompt_tokens + params.min_tokens > max_model_len:
        raise RequestRejected(
            f"min_tokens is {params.min_tokens}, more than the {max_model_len - num_prompt_tokens}"
            f" tokens max_model_len {max_model_len} leaves after the prompt of "
            f"{num_prompt_tokens} tokens", param="min_tokens", code="context_length_exceeded")
    max_seq_len = max_model_len if max_num_tokens is None else max_num_tokens
    num_blocks_needed = kv_cache.num_blocks_for(max_seq_len)
    if num_blocks_needed > kv_cache.num_blocks:
        raise RequestRejected(
            f"up to {max_seq_len} tokens need {num_blocks_needed} KV blocks, the pool has "
            f"{kv_cache.num_blocks}", param="max_tokens" if max_num_tokens else "prompt")
