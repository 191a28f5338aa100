"""Workloads: the Azure trace reader on the real 2023 traces, ShareGPT-style JSON (with and
without a tokenizer), seeded synthetic draws, and shaping (scale, window, long requests)."""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import random
import statistics
import struct

import pytest

from cluster.workload import (
    RequestSpec,
    Workload,
    WorkloadError,
    length_sampler,
    read_azure_csv,
    read_sharegpt_json,
    shape,
    synthetic,
    synthetic_prompt,
    synthetic_prompt_packed,
)

DATA = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
CONV = DATA / "AzureLLMInferenceTrace_conv.csv"


@pytest.mark.skipif(not CONV.exists(), reason="the shared Azure traces are not here")
def test_azure_conversation_trace() -> None:
    w = read_azure_csv(CONV)
    assert len(w.requests) == 19366
    first = w.requests[0]
    assert (first.arrival_s, first.prompt_len, first.output_len) == (0.0, 374, 44)
    assert w.requests[1].arrival_s == pytest.approx(4.314579)  # 18:15:50.995169 - 46.680590
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(w.requests))
    assert 3500 < w.duration_s < 3510  # about an hour
    assert sum(r.output_len for r in w.requests) == 4088665


def test_sharegpt_lengths_from_fields_and_from_a_tokenizer(tmp_path: pathlib.Path,
                                                           smollm2_tokenizer) -> None:
    fields = tmp_path / "lengths.json"
    fields.write_text(json.dumps([{"prompt_len": 10, "output_len": 5},
                                  {"prompt_len": 7, "output_len": 3}]))
    w = read_sharegpt_json(fields, rate=math.inf)
    assert [(r.prompt_len, r.output_len, r.arrival_s) for r in w.requests] == [
        (10, 5, 0.0), (7, 3, 0.0)]
    chats = tmp_path / "sharegpt.json"
    chats.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "Hello there, how are you?"},
                                      {"from": "gpt", "value": "Fine, thanks."}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn"}]},
    ]))
    with pytest.raises(WorkloadError, match="needs a tokenizer"):
        read_sharegpt_json(chats, rate=1.0)
    w = read_sharegpt_json(chats, rate=2.0, seed=1, tokenizer=smollm2_tokenizer)
    (r,) = w.requests  # the conversation without a reply is skipped
    ids = smollm2_tokenizer("Hello there, how are you?").input_ids
    assert r.prompt_token_ids == tuple(ids) and r.prompt_len == len(ids)
    assert r.output_len == len(smollm2_tokenizer("Fine, thanks.").input_ids)
    assert r.arrival_s > 0


def test_synthetic_is_seeded_and_follows_its_distributions() -> None:
    a = synthetic(4000, 10.0, "lognormal:mean=500,sigma=0.8", "uniform:low=10,high=30", seed=7)
    assert a == synthetic(4000, 10.0, "lognormal:mean=500,sigma=0.8", "uniform:low=10,high=30",
                          seed=7)
    assert a != synthetic(4000, 10.0, "lognormal:mean=500,sigma=0.8", "uniform:low=10,high=30",
                          seed=8)
    prompts = [r.prompt_len for r in a.requests]
    outputs = [r.output_len for r in a.requests]
    assert statistics.mean(prompts) == pytest.approx(500, rel=0.05)
    assert min(outputs) == 10 and max(outputs) == 30
    gaps = [b.arrival_s - x.arrival_s for x, b in itertools.pairwise(a.requests)]
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.05)  # Poisson at 10 req/s
    bursty = synthetic(4000, 10.0, "8", "8", seed=7, process="gamma", burstiness=0.25)
    bursty_gaps = [b.arrival_s - x.arrival_s for x, b in itertools.pairwise(bursty.requests)]
    assert statistics.mean(bursty_gaps) == pytest.approx(0.1, rel=0.1)
    assert statistics.stdev(bursty_gaps) > 1.5 * statistics.stdev(gaps)  # cv 2 vs 1
    assert {r.arrival_s for r in synthetic(5, math.inf, "8", "8").requests} == {0.0}


@pytest.mark.parametrize("spec", ["0", "uniform:low=5", "uniform:low=9,high=3",
                                  "lognormal:mean=0.5,sigma=1", "normal:mean=3", "abc"])
def test_bad_length_specs(spec: str) -> None:
    import random

    with pytest.raises(WorkloadError, match="length"):
        length_sampler(spec, random.Random(0))


def test_shaping() -> None:
    requests = tuple(RequestSpec(float(i), 100 * (i + 1), 50) for i in range(6))
    w = Workload(requests, "six")
    scaled = shape(w, time_scale=0.5)
    assert [r.arrival_s for r in scaled.requests] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert len(shape(w, duration_s=2.0).requests) == 3
    assert len(shape(w, time_scale=2.0, duration_s=2.0).requests) == 2
    assert len(shape(w, num_requests=4).requests) == 4
    dropped = shape(w, max_model_len=300)  # 150, 250 fit; 350 .. 650 do not
    assert (len(dropped.requests), dropped.num_dropped, dropped.num_clipped) == (2, 4, 0)
    clipped = shape(w, max_model_len=300, long_policy="clip")
    assert (len(clipped.requests), clipped.num_dropped, clipped.num_clipped) == (6, 0, 4)
    assert all(r.prompt_len + r.output_len <= 300 and r.output_len >= 1
               for r in clipped.requests)
    assert (clipped.requests[2].prompt_len, clipped.requests[2].output_len) == (299, 1)
    with pytest.raises(WorkloadError, match="no request left"):
        shape(w, duration_s=-1.0)


def test_synthetic_prompt_is_its_index_then_the_filler() -> None:
    """synthetic_prompt equals its definition: the index in four base-256 digits, each + 2,
    then the seeded filler's bytes + 2, whatever length was asked for before (the filler grows
    to 2^16 here and must keep its start); synthetic_prompt_packed is its packing."""
    filler = [b + 2 for b in random.Random("xyserve-filler").randbytes(1 << 16)]
    for index, prompt_len in ((0, 1), (7, 300), (2**24 + 5, 3), (123, 4096), (9, 40_000),
                              (8, 5)):
        digits = [2 + (index >> shift & 255) for shift in (24, 16, 8, 0)]
        expected = (digits + filler)[:prompt_len]
        # its packing, the bytes EngineCore.add_request hashes, first: it grows the filler too
        assert synthetic_prompt_packed(index, prompt_len) == struct.pack(
            f"{prompt_len}q", *expected)
        prompt = synthetic_prompt(index, prompt_len)
        assert prompt == expected and all(type(t) is int for t in prompt)


def test_synthetic_prompts_share_nothing() -> None:
    a, b = synthetic_prompt(1, 256), synthetic_prompt(2, 256)
    assert a == synthetic_prompt(1, 256) and len(a) == 256
    assert a[:16] != b[:16] and min(a) >= 2


def test_window_start() -> None:
    w = Workload(tuple(RequestSpec(float(i), 100, 10) for i in range(10)), "ten")
    window = shape(w, start_s=3.0, duration_s=4.0)
    assert [r.arrival_s for r in window.requests] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [r.arrival_s for r in shape(w, start_s=6.0, time_scale=2.0).requests] == [
        0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    with pytest.raises(WorkloadError, match="window start"):
        shape(w, start_s=-1.0)
