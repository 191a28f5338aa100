"""The replayed layer stack (npu_sim.kernels.replay) computes and records exactly what launching
the layers one by one does: the same tokens and log-probabilities to the bit, the same launches
counted and the same simulated time."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import pytest
import torch

import npu_sim.kernels.replay as replay
from engine import LLM, SamplingParams
from npu_sim.kernels import native

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the replay needs the C kernels")

# decodes; a 50-token prompt and short ones (C chunks all: every step replays)
PROMPTS = [[5, 17, 300, 42, 9, 1000, 77], list(range(40, 90)), [1, 2, 3], [2000] * 12]
RUN = replay.LayerStack.run


def _generate(model: pathlib.Path, monkeypatch: pytest.MonkeyPatch, replayed: bool,
              prompts: list[list[int]] = PROMPTS, num_kv_blocks: int = 32,
              **options: Any) -> tuple[list[Any], dict[str, Any], int]:
    """(per prompt (token ids, logprobs), the device's counters, number of replayed steps)"""
    num_replays = [0]

    def counted(self: replay.LayerStack, *args: Any) -> Any:
        out = RUN(self, *args) if replayed else None
        num_replays[0] += out is not None
        return out

    monkeypatch.setattr(replay.LayerStack, "run", counted)
    llm = LLM(model=str(model), num_kv_blocks=num_kv_blocks, block_size=16, **options)
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, ignore_eos=True)
    outs = llm.generate(prompts, params)
    device = llm.engine.runner.device
    counters = {"sim_s": device.total_sim_s, "launches": dict(device.num_launches),
                "tasks": dict(device.num_tasks), "steps": llm.engine.num_steps}
    return ([(o.token_ids, [repr(lp) for lp in o.outputs[0].logprobs]) for o in outs], counters,
            num_replays[0])


# 2 threads: decode steps run in decoder.c's one parallel region; 1 thread: kernel by kernel
@pytest.mark.parametrize("fixture, options, num_threads", [
    ("tiny_llama_dir", {"dtype": "float32"}, 2),
    ("tiny_llama_dir", {"dtype": "float32"}, 1),
    ("tiny_qwen2_dir", {"dtype": "float32"}, 2),  # biased QKV projection
    ("tiny_llama_dir", {"dtype": "float32", "kv_cache_dtype": "bfloat16"}, 2),
    ("tiny_q4_gguf_path", {"dtype": "float32", "weight_format": "gguf"}, 2),
    # bf16 weights: each thread rounds the activations itself (AMX tiles or vdpbf16ps where
    # the CPU has them)
    ("tiny_llama_dir", {"dtype": "float32", "weight_format": "bf16"}, 2),
    ("tiny_llama_dir", {"dtype": "float32", "weight_format": "bf16"}, 1),
    ("tiny_q4_gguf_path", {"dtype": "float32", "weight_format": "gguf+bf16"}, 2),
])
def test_replay_matches_launching_layer_by_layer(fixture: str, options: dict[str, Any],
                                                 num_threads: int, request: pytest.FixtureRequest,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = request.getfixturevalue(fixture)
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    options = {**options, "threads": num_threads}
    by_launch, launch_counters, none = _generate(model, monkeypatch, False, **options)
    replayed, replay_counters, num_replays = _generate(model, monkeypatch, True, **options)
    # Every step replays, the prefill of all four prompts too (its short prompts C chunks),
    # but where fp32 panels cannot take its rows (GEMM_MAX_ROWS: ATen's GEMM takes over).
    fp32_panels = "weight_format" not in options
    too_many_rows = sum(map(len, PROMPTS)) > native.GEMM_MAX_ROWS
    assert none == 0 and num_replays == replay_counters["steps"] - (fp32_panels and too_many_rows)
    assert replayed == by_launch
    assert replay_counters == launch_counters


@pytest.mark.parametrize("fixture, prompt_len, num_streams, options", [
    # heads of 16: fp32 arithmetic, in parts past 256 keys, also on a bf16 cache
    ("tiny_llama_dir", 400, 1, {"dtype": "float32"}),
    ("tiny_llama_dir", 400, 2, {"dtype": "float32", "kv_cache_dtype": "bfloat16"}),
    # heads of 64 on a bf16 cache: a lone stream on fp32 arithmetic, two on AMX tiles where the
    # CPU has them, in parts past 1,024 keys
    ("tiny_llama_d64_long_dir", 1100, 1, {"dtype": "float32", "kv_cache_dtype": "bfloat16"}),
    ("tiny_llama_d64_long_dir", 1100, 2, {"dtype": "float32", "kv_cache_dtype": "bfloat16"}),
])
def test_long_contexts_attended_in_parts_are_the_same_however_run(
        fixture: str, prompt_len: int, num_streams: int, options: dict[str, Any],
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes of long contexts are attended in parts (attention.c's PART_KEYS, AMX_PART_KEYS),
    spread over the threads and merged: the one parallel region (2 threads) and the kernels one
    by one (on 2 threads and on 1) give the same tokens and log-probabilities to the bit."""
    model = request.getfixturevalue(fixture)
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    prompts = [[(7 * i + s) % 1000 + 1 for i in range(prompt_len)] for s in range(num_streams)]
    num_kv_blocks = num_streams * (prompt_len // 16 + 2)
    runs = [_generate(model, monkeypatch, replayed, prompts=prompts, num_kv_blocks=num_kv_blocks,
                      **options, threads=threads)
            for replayed, threads in ((True, 2), (False, 2), (False, 1))]
    assert runs[0][2] >= 9  # its 9 decode steps at least (ATen multiplies the long chunks)
    assert runs[0][0] == runs[1][0] == runs[2][0]


def test_no_replay_without_the_c_kernels_or_on_the_reference_path(
        tiny_llama_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with native.disabled():
        assert replay.LayerStack.prepare([], num_heads=4, eps=1e-6) is None
    _, _, num_replays = _generate(tiny_llama_dir, monkeypatch, True, dtype="float32",
                                  strict_kernels=True)
    assert num_replays == 0  # the reference path walks every task


@pytest.mark.parametrize("num_threads", [1, 2])
def test_a_slot_outside_the_cache_is_an_index_error(tiny_llama_dir: pathlib.Path,
                                                    num_threads: int,
                                                    request: pytest.FixtureRequest) -> None:
    request.addfinalizer(functools.partial(torch.set_num_threads, torch.get_num_threads()))
    llm = LLM(model=str(tiny_llama_dir), num_kv_blocks=4, block_size=16, dtype="float32",
              threads=num_threads)
    bad = {}
    run = replay.LayerStack.run

    def with_bad_slot(self: replay.LayerStack, attention: Any, step: Any) -> Any:
        slots = torch.full_like(step.slot_mapping, 4 * 16)  # one past the last slot
        try:
            return run(self, attention, replay.StepOperands(
                residual=step.residual, x=step.x, cos=step.cos, sin=step.sin,
                slot_mapping=slots))
        except IndexError as exc:
            bad["error"] = str(exc)
            raise

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay.LayerStack, "run", with_bad_slot)
        out = llm.generate([[5, 17, 300]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out[0].outputs[0].finish_reason == "error"  # the request ends; the engine goes on
    assert "KV write" in bad["error"] and "outside the cache" in bad["error"]


def test_gguf_and_bf16_weights_serve_a_lone_stream_on_the_blocks(
        tiny_q4_gguf_path: pathlib.Path) -> None:
    """gguf+bf16: steps of one row run on the GGUF blocks, larger ones on bf16, bit for bit
    what each format alone computes (a one-token prompt: every step one row; two prompts
    decoding together: every step two rows), on the same KV cache."""
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)

    def run(weight_format: str, prompts: list[list[int]]) -> list[Any]:
        llm = LLM(model=str(tiny_q4_gguf_path), dtype="float32", weight_format=weight_format,
                  kv_cache_dtype="bfloat16", num_kv_blocks=32, block_size=16)
        return [(o.token_ids, [repr(lp) for lp in o.outputs[0].logprobs])
                for o in llm.generate(prompts, params)]

    lone, pair = [[5]], [[5, 17], [300, 42]]
    assert run("gguf+bf16", lone) == run("gguf", lone)
    assert run("gguf+bf16", pair) == run("bf16", pair)
