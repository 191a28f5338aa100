"""Weight formats: a GGUF model's own Q4_1 blocks multiplied as they ship (`gguf`) compute what
its dequantized fp32 weights compute, up to the order of the sums; bf16 weights stay close."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from npu_sim.kernels import native

PROMPTS = [[5, 17, 300, 42, 9, 1000, 77], [1, 2, 3], list(range(40, 90)), [2000] * 12]


def run(model: pathlib.Path, weight_format: str,
        expect: set[str] | None = None) -> list[tuple[list[int], list[float]]]:
    llm = LLM(model=str(model), dtype="float32", weight_format=weight_format,
              num_kv_blocks=32, block_size=16)
    assert llm.engine.runner.model.weight_formats == (expect or {weight_format})
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    out = llm.generate(PROMPTS, params)
    return [(o.token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in out]


@pytest.mark.skipif(native.lib() is None, reason="the packed formats need the C kernels")
def test_gguf_blocks_match_their_fp32_dequantization(tiny_q4_gguf_path: pathlib.Path) -> None:
    fp32, q4 = run(tiny_q4_gguf_path, "fp32"), run(tiny_q4_gguf_path, "gguf", {"q4_1"})
    for (ids_a, lp_a), (ids_b, lp_b) in zip(fp32, q4, strict=True):
        assert ids_a == ids_b  # greedy: the same tokens
        assert lp_a == pytest.approx(lp_b, abs=2e-5)  # only the summation order differs


@pytest.mark.skipif(native.lib() is None, reason="the packed formats need the C kernels")
def test_bf16_weights_stay_close(tiny_llama_dir: pathlib.Path) -> None:
    fp32, bf16 = run(tiny_llama_dir, "fp32"), run(tiny_llama_dir, "bf16")
    for (_, lp_a), (_, lp_b) in zip(fp32, bf16, strict=True):
        # the first token's logprob moves by the weights' rounding only (2^-8 relative)
        assert lp_a[0] == pytest.approx(lp_b[0], abs=0.05)


def test_gguf_needs_a_gguf_source(tiny_llama_dir: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="does not ship GGUF blocks"):
        LLM(model=str(tiny_llama_dir), weight_format="gguf", num_kv_blocks=8, block_size=16)


@pytest.mark.skipif(native.lib() is None, reason="the packed formats need the C kernels")
def test_the_npu_model_streams_the_weights_as_served(tiny_q4_gguf_path: pathlib.Path,
                                                     tiny_llama_dir: pathlib.Path) -> None:
    def lowering(model: pathlib.Path, **options: str) -> tuple[str, str]:
        llm = LLM(model=str(model), dtype="float32", num_kv_blocks=8, block_size=16, **options)
        policy = llm.engine.runner.lowering
        return policy.weights, policy.lm_head_weights

    assert lowering(tiny_q4_gguf_path, weight_format="gguf")[0] == "w4a16"  # Q4_1 blocks
    assert lowering(tiny_llama_dir, weight_format="fp32") == ("bf16", "bf16")
    assert lowering(tiny_llama_dir, npu_weights="w8a16") == ("w8a16", "bf16")  # layers only
