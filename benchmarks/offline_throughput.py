"""Offline throughput and where the step time goes: `LLM.generate` on N prompts at once.

Runs the engine in process (no HTTP) on random prompts and reports tokens/s, the fraction of this
machine's fp32 GEMM roofline reached, and a wall-time breakdown of the engine steps measured with
timers around the engine's parts (not cProfile, whose per-call cost would inflate the Python
side): the kernels' work (GEMM, attention, vector ops; a step's decoder layers when they are
replayed in one call), the sampler, and the engine's own
overhead — scheduling, lowering, the cost model (simulated NPU timing), input preparation, launch
bookkeeping, detokenizing and the rest of the loop. Optionally compares with transformers
`generate` one prompt at a time.

    .venv/bin/python -m benchmarks.offline_throughput --num-prompts 16 --input-len 15 \
        --max-tokens 128                                                     # decode-heavy
    .venv/bin/python -m benchmarks.offline_throughput --num-prompts 64 --input-len 150 \
        --max-tokens 64                                                      # prefill-heavy
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import time
from collections.abc import Callable
from typing import Any

import torch

import engine.core
import engine.runner
import npu_sim.device
import npu_sim.kernels
from benchmarks.machine import ModelFlops, gemm_rates
from engine import LLM, SamplingParams
from engine.config import WEIGHT_FORMATS
from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from npu_sim.kernels.replay import LayerStack

ENGINE_OVERHEAD = ("scheduling", "lowering", "cost model", "detokenizing")


class StepTimers:
    """Wall time per part of the engine step, from wrappers installed on classes / modules."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, category: str | Callable[..., str]) -> None:
        original = getattr(owner, name)
        seconds = self.seconds

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                cat = category if isinstance(category, str) else category(*args)
                seconds[cat] += time.perf_counter() - start

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def install(self) -> StepTimers:
        dev = npu_sim.device
        self.wrap(engine.core.EngineCore, "step", "step")
        self.wrap(Scheduler, "schedule", "scheduling")
        self.wrap(Scheduler, "update_rows_from_output", "scheduling")  # the engine's call
        self.wrap(engine.runner, "lower_step", "lowering")
        self.wrap(engine.runner.ModelRunner, "_step_inputs", "input preparation")
        # (the compute runner ends every step so; it calls end_step where it must)
        self.wrap(dev.Device, "end_planned_step", "cost model")
        self.wrap(dev.Device, "launch", "launches")
        self.wrap(LayerStack, "run", "kernels: replayed decoder layers")
        kernels = npu_sim.kernels
        self.wrap(kernels, "run_gemm", lambda k, *a: "kernels: lm_head GEMM"
                  if k.name == "lm_head" else "kernels: layer GEMMs")
        self.wrap(kernels, "run_attention", "kernels: attention")
        self.wrap(kernels, "run_vector", "kernels: vector ops")
        self.wrap(Sampler, "sample", "sampler")
        self.wrap(IncrementalDetokenizer, "update", "detokenizing")
        return self

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def breakdown(self) -> list[tuple[str, float]]:
        """(part, seconds) adding up to the total step time."""
        s = dict(self.seconds)
        step = s.pop("step", 0.0)
        kernels = sum(v for k, v in s.items() if k.startswith("kernels"))
        # launch() contains the kernels (all but the replayed layers): keep only its own share
        s["launch bookkeeping"] = s.pop("launches", 0.0) - (
            kernels - s.get("kernels: replayed decoder layers", 0.0))
        s["rest of the step (forward glue, outputs)"] = step - sum(s.values())
        return sorted(s.items(), key=lambda kv: -kv[1])


def make_prompts(num_prompts: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num_prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="requests running at once (default: the engine's); below "
                             "--num-prompts the rest queue and join as others finish, as a "
                             "closed-loop client at that concurrency sends them")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs; the fastest is reported (others' load only slows)")
    parser.add_argument("--hf", action="store_true",
                        help="also time transformers generate, one prompt at a time")
    args = parser.parse_args()

    seqs = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    llm = LLM(model=args.model, dtype=args.dtype, weight_format=args.weight_format,
              max_num_batched_tokens=args.max_num_batched_tokens, **seqs)
    arch = llm.engine.info.arch
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(make_prompts(2, args.input_len, arch.vocab_size, seed=0),
                 SamplingParams(max_tokens=2))  # warm up
    num_in = args.num_prompts * args.input_len

    best: tuple[float, StepTimers, int] | None = None
    for repeat in range(args.repeats):
        # new prompts every time: the prefix cache must not serve a repeat's prompts
        prompts = make_prompts(args.num_prompts, args.input_len, arch.vocab_size, seed=1 + repeat)
        timers = StepTimers().install()
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        timers.uninstall()
        if best is None or elapsed < best[0]:
            best = (elapsed, timers, llm.engine.num_steps)
    assert best is not None
    elapsed, timers, _ = best
    num_out = sum(len(o.token_ids) for o in outs)
    rates = gemm_rates()
    flops = ModelFlops.of(arch)
    work = flops.work(num_in + num_out, num_out)
    roofline = rates["fp32_roofline"]
    print(f"xyserve LLM.generate ({args.dtype}, {torch.get_num_threads()} threads): "
          f"{len(prompts)} prompts x {args.input_len} tokens -> {args.max_tokens} tokens, "
          f"best of {args.repeats}: {elapsed:.2f} s")
    print(f"  {num_out / elapsed:.1f} generated tok/s, {(num_in + num_out) / elapsed:.1f} "
          f"total tok/s; {work / elapsed:.0f} GFLOP/s = {work / elapsed / roofline:.1%} of the "
          f"fp32 roofline ({roofline:.0f} GFLOP/s; GEMM 2048^3: "
          + ", ".join(f"{k} {v:.0f}" for k, v in rates.items() if "roofline" not in k) + ")")
    parts = timers.breakdown()
    step_total = timers.seconds["step"]
    print(f"  step wall time {step_total:.2f} s, by part:")
    for name, seconds in parts:
        print(f"    {name:42s} {seconds:7.3f} s {100 * seconds / step_total:5.1f}%")
    overhead = sum(s for n, s in parts if n in ENGINE_OVERHEAD)
    glue = sum(s for n, s in parts if not n.startswith("kernels") and n != "sampler")
    print(f"  engine overhead (scheduling + lowering + cost model + detokenizing): "
          f"{100 * overhead / step_total:.1f}% of step wall time")
    print(f"  all engine-side Python (everything but kernels and sampler): "
          f"{100 * glue / step_total:.1f}%")

    if args.hf:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(llm.engine.info.model_path,
                                                                  dtype=torch.float32)
        start = time.perf_counter()
        hf_out = 0
        with torch.inference_mode():
            for ids in prompts:
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                     max_new_tokens=args.max_tokens,
                                     min_new_tokens=args.max_tokens, do_sample=False)
                hf_out += out.shape[1] - len(ids)
        hf_s = time.perf_counter() - start
        print(f"transformers generate, one prompt at a time: {hf_out / hf_s:.1f} gen tok/s "
              f"(xyserve {num_out / elapsed / (hf_out / hf_s):.2f}x)")


if __name__ == "__main__":
    main()
