"""What structured outputs cost a batch: 16 requests, half of them JSON-schema-constrained, against
the same 16 unconstrained (issue #19's target: at most 10% less throughput).

Runs the engine in process (`LLM.generate`, the default model unless --model) on the same prompts
twice per repetition, unconstrained then mixed, interleaved so that machine noise hits both alike,
and reports, per run, output tokens per wall second and the process's CPU milliseconds per output
token (all its threads, the mask-filling worker included: a measure that other processes on a
shared machine disturb far less than wall time), the medians, and the loss on each. Unconstrained
requests run to max_tokens (ignore_eos). One engine thread by default, so that the runs are
comparable on a shared machine.

Two schemas:
- `long` (default): an object with an array of at least 1000 strings, so a constrained request
  never completes and runs to max_tokens like the unconstrained ones (every request runs the
  same number of steps: the difference is the masks' cost alone);
- `small`: a three-field object (name, age, tags) that completes early; the batch still runs
  max_tokens steps (its unconstrained half), with fewer rows in the later ones, so the mixed
  batch makes fewer tokens for less work: compare CPU seconds per batch there, not per token.

    .venv/bin/python -m benchmarks.structured_throughput                    # long schema
    .venv/bin/python -m benchmarks.structured_throughput --schema small --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace

from engine import LLM, SamplingParams
from engine.config import DEFAULT_MODEL
from engine.structured import StructuredOutputs

SCHEMAS = {
    "long": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string"}, "minItems": 1000}},
        "required": ["items"]},
    "small": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
        "required": ["name", "age", "tags"]},
}


@dataclass(frozen=True)
class Run:
    constrained: int  # requests of the batch under the schema
    output_tokens: int  # generated in all
    wall_s: float  # the generate call
    cpu_s: float  # CPU seconds of this process (all threads) during the call

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def cpu_ms_per_token(self) -> float:
        return 1e3 * self.cpu_s / self.output_tokens


def prompts(num: int) -> list[str]:
    return [f"Write a JSON object describing person number {i}: their name, age and a few "
            f"tags about their hobbies." for i in range(num)]


def run_batch(llm: LLM, texts: list[str], params: list[SamplingParams]) -> Run:
    start, start_cpu = time.perf_counter(), time.process_time()
    outputs = llm.generate(texts, params)
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    constrained = sum(p.structured_outputs is not None for p in params)
    for out, p in zip(outputs, params, strict=True):  # constrained outputs parse (small schema)
        if p.structured_outputs is not None and out.outputs[0].finish_reason == "stop":
            json.loads(out.outputs[0].text)
    return Run(constrained, tokens, wall_s, cpu_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--schema", choices=SCHEMAS, default="long", help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="engine threads (default: "
                        "%(default)s; the mask worker is another)")
    args = parser.parse_args()

    llm = LLM(args.model, max_num_seqs=args.batch, threads=args.threads, seed=0)
    texts = prompts(args.batch)
    plain = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=1, ignore_eos=True)
    schema = replace(plain, ignore_eos=False,
                     structured_outputs=StructuredOutputs.json(SCHEMAS[args.schema]))
    unconstrained = [plain] * args.batch
    mixed = [schema if i % 2 else plain for i in range(args.batch)]
    run_batch(llm, texts[:2], [plain, schema])  # warm-up: the grammar compiled, caches filled

    runs: dict[str, list[Run]] = {"unconstrained": [], "mixed": []}
    for _ in range(args.repeats):
        runs["unconstrained"].append(run_batch(llm, texts, unconstrained))
        runs["mixed"].append(run_batch(llm, texts, mixed))
    print(f"model {args.model}, batch {args.batch} ({args.batch // 2} constrained in the mixed "
          f"runs), max_tokens {args.max_tokens}, schema {args.schema}, {args.repeats} repeats")
    rate, cpu = {}, {}
    for name, found in runs.items():
        rates = [r.tokens_per_s for r in found]
        cpus = [r.cpu_ms_per_token for r in found]
        rate[name], cpu[name] = statistics.median(rates), statistics.median(cpus)
        print(f"  {name:13s} output tokens {found[0].output_tokens:5d}   tokens/s (wall) "
              f"{' '.join(f'{x:6.1f}' for x in rates)}  median {rate[name]:6.1f}")
        print(f"  {'':13s} {'':19s} CPU ms/token   {' '.join(f'{x:6.1f}' for x in cpus)}  "
              f"median {cpu[name]:6.1f}")
        batch_cpu = [r.cpu_s for r in found]
        print(f"  {'':13s} {'':19s} CPU s/batch    {' '.join(f'{x:6.2f}' for x in batch_cpu)}  "
              f"median {statistics.median(batch_cpu):6.2f}")
    wall_loss = 1 - rate["mixed"] / rate["unconstrained"]
    cpu_loss = 1 - cpu["unconstrained"] / cpu["mixed"]
    print(f"  throughput loss with half the batch constrained (target <= 10%): "
          f"{100 * wall_loss:.1f}% by wall tokens/s, {100 * cpu_loss:.1f}% by CPU time per token")


if __name__ == "__main__":
    main()
