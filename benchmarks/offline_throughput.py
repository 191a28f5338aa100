"""Offline throughput: `LLM.generate` on N prompts at once vs transformers `generate` one by one.

Both run the same fp32 weights on this CPU. Also profiles the engine run and reports the share of
wall time spent in xyserve's own Python (scheduling, lowering, launch bookkeeping, sampling
glue, detokenizing) as opposed to inside torch kernels.

    .venv/bin/python benchmarks/offline_throughput.py --num-prompts 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import time

import torch
import transformers

from engine import LLM, SamplingParams

TOPICS = ["the ocean", "a robot", "bread", "the moon", "mathematics", "a city at night",
          "trains", "the history of tea", "volcanoes", "a lost key", "chess", "rain"]


def make_prompts(tokenizer, num_prompts: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        text = f"Write a short story about {rng.choice(TOPICS)}. " * rng.randint(1, 6)
        prompts.append(tokenizer(text).input_ids)
    return prompts


def own_python_share(profile: cProfile.Profile) -> tuple[float, float]:
    """(seconds in frames of engine/ and npu_sim/ themselves, total profiled seconds)."""
    stats = pstats.Stats(profile)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    own = sum(tottime for (path, _, _), (_, _, tottime, _, _) in stats.stats.items()
              if path.startswith((os.path.join(root, "engine"), os.path.join(root, "npu_sim"))))
    return own, stats.total_tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    llm = LLM(model=args.model, dtype="float32",
              max_num_batched_tokens=args.max_num_batched_tokens)
    prompts = make_prompts(llm.tokenizer, args.num_prompts, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    num_prompt_tokens = sum(map(len, prompts))
    llm.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm up

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    outs = llm.generate(prompts, params)
    profile.disable()
    engine_s = time.perf_counter() - start
    num_out = sum(len(o.token_ids) for o in outs)
    own_s, total_s = own_python_share(profile)
    print(f"xyserve LLM.generate: {len(prompts)} prompts, {num_prompt_tokens} prompt + {num_out} "
          f"generated tokens in {engine_s:.1f} s (under cProfile) -> "
          f"{num_prompt_tokens / engine_s:.0f} prompt tok/s, {num_out / engine_s:.1f} gen tok/s")
    print(f"  time in xyserve's own Python frames: {own_s:.2f} s of {total_s:.2f} s "
          f"({100 * own_s / total_s:.1f}%)")

    # The same run without the profiler, for the throughput figure.
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    engine_s = time.perf_counter() - start
    print(f"xyserve LLM.generate (no profiler): {engine_s:.1f} s -> "
          f"{num_prompt_tokens / engine_s:.0f} prompt tok/s, {num_out / engine_s:.1f} gen tok/s")
    if args.skip_hf:
        return

    model = transformers.AutoModelForCausalLM.from_pretrained(llm.engine.model_path,
                                                              dtype=torch.float32)
    start = time.perf_counter()
    hf_out = 0
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                 max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                                 do_sample=False)
            hf_out += out.shape[1] - len(ids)
    hf_s = time.perf_counter() - start
    print(f"transformers generate, one prompt at a time: {hf_s:.1f} s -> "
          f"{num_prompt_tokens / hf_s:.0f} prompt tok/s, {hf_out / hf_s:.1f} gen tok/s")
    print(f"ratio (xyserve / transformers), generated tokens/s: "
          f"{(num_out / engine_s) / (hf_out / hf_s):.2f}x")


if __name__ == "__main__":
    main()
