"""engine.chunks: check_stop's shortcut below a request's first_stop_output_len."""

from __future__ import annotations

import random

import pytest

from engine.chunks import check_stop, first_stop_output_len
from engine.request import Request, SamplingParams

EOS = 2
STOP = 42
TOKENS = (EOS, STOP, 5)  # a token of each kind check_stop tells apart


def _request(rng: random.Random, max_model_len: int) -> Request:
    num_prompt_tokens = rng.randint(1, max_model_len - 1)
    max_tokens = rng.choice([None, rng.randint(1, 12)])
    min_tokens = rng.randint(0, 4 if max_tokens is None else min(4, max_tokens))
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens,
                            ignore_eos=rng.random() < 0.5,
                            stop_token_ids=rng.choice([(), (STOP,)]))
    return Request("r", [7] * num_prompt_tokens, params, 0.0,
                   eos_token_id=rng.choice([None, EOS]))


@pytest.mark.parametrize("seed", range(4))
def test_first_stop_output_len_is_the_first_output_len_check_stop_can_stop(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        max_model_len = rng.randint(2, 16)
        request = _request(rng, max_model_len)
        first = first_stop_output_len(request, max_model_len)
        # check_stop in full (its shortcut off) for every output length and newest token
        stops_at = []
        for num_output_tokens in range(1, max_model_len + 1):
            for token_id in TOKENS:
                request.output_token_ids = [5] * (num_output_tokens - 1) + [token_id]
                if check_stop(request, max_model_len) is not None:
                    stops_at.append(num_output_tokens)
        assert max(first, 1) == min(stops_at)  # (a check follows at least one token)
        # and with the shortcut on, check_stop says the same for every output length
        for num_output_tokens in range(1, max_model_len + 1):
            for token_id in TOKENS:
                request.output_token_ids = [5] * (num_output_tokens - 1) + [token_id]
                request.first_stop_output_len = 0
                expected = check_stop(request, max_model_len)
                request.first_stop_output_len = first
                assert check_stop(request, max_model_len) == expected


def test_first_stop_output_len_values() -> None:
    ignored = SamplingParams(max_tokens=10, ignore_eos=True)
    assert first_stop_output_len(Request("a", [7] * 4, ignored, 0.0, EOS), 100) == 10
    assert first_stop_output_len(Request("a", [7] * 95, ignored, 0.0, EOS), 100) == 5
    eos_after_3 = SamplingParams(max_tokens=10, min_tokens=3)
    assert first_stop_output_len(Request("a", [7] * 4, eos_after_3, 0.0, EOS), 100) == 3
    assert first_stop_output_len(Request("a", [7] * 4, eos_after_3, 0.0, None), 100) == 10
