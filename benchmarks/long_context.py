"""Decode time a token at long contexts, in process: N streams, each with a prompt of L tokens.

For each (streams, prompt length) the engine (`--dtype auto` by default) takes N fresh random
prompts (no prefix-cache hits), steps until every one has its first token (the prefills done),
then times T steps: decodes of the N streams alone, at contexts of L .. L + T keys. Prints the
best of `--repeats`. What it shows is mostly the decode attention, which grows with the context
while the GEMMs do not (the default model on a 2-core AMX Xeon: a lone stream's token 5.5 ms at
15 keys, 15 ms at 4,000).

    .venv/bin/python -m benchmarks.long_context --streams 1 3 16 --prompt-lens 1000 4000
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what `xyserve serve` runs with

import argparse
import itertools
import time

from benchmarks.offline_throughput import make_prompts
from engine import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[15, 1000, 4000])
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed (T)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    longest = max(args.prompt_lens) + args.tokens + 2
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=max(args.streams),
              max_model_len=longest,
              num_kv_blocks=max(args.streams) * (-(-longest // 16) + 1), block_size=16)
    core = llm.engine
    vocab = core.info.arch.vocab_size
    ids = itertools.count()  # request ids, and each call's prompts' seed

    def step_seconds(streams: int, prompt_len: int, steps: int) -> float:
        """One decode step of `streams` fresh streams, averaged over `steps` steps."""
        params = SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=0.0)
        waiting = set()
        for prompt in make_prompts(streams, prompt_len, vocab, seed=next(ids)):
            request_id = str(next(ids))
            core.add_request(request_id, prompt, params)
            waiting.add(request_id)
        while waiting:  # prefills (and a first decode or so for the early ones)
            waiting -= {out.request_id for out in core.step() if out.new_token_ids}
        start = time.perf_counter()
        for _ in range(steps):
            core.step()
        elapsed = time.perf_counter() - start
        while core.has_unfinished_requests():  # (their last tokens: frees their blocks)
            core.step()
        return elapsed / steps

    print(f"{args.model}, --dtype {args.dtype}, {os.cpu_count()} CPUs: decode step time "
          f"(best of {args.repeats}, {args.tokens} steps each)")
    for streams in args.streams:
        for prompt_len in args.prompt_lens:
            step_seconds(streams, prompt_len, 2)  # warm: shapes seen once
            step_s = min(step_seconds(streams, prompt_len, args.tokens)
                         for _ in range(args.repeats))
            print(f"  {streams:3d} streams x {prompt_len:5d} keys: {step_s * 1e3:7.2f} ms a step, "
                  f"{streams / step_s:7.1f} tok/s")


if __name__ == "__main__":
    main()
