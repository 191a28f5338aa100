"""Served throughput of two xyserve source trees, run by run: A/B for a change to the server.

Starts `xyserve serve` twice, the A side from another checkout of the source (`--a-tree`, put
first on PYTHONPATH; e.g. `git worktree add /tmp/base <commit>`) and the B side from this one, both
with default options, and alternates compare_peers' decode-heavy workload between them (A B,
then B A, ...): both servers stay up, the idle one idle, so a machine that speeds up or slows
down weighs on both sides alike. Prints each round and the median of the per-round ratios B / A.

    .venv/bin/python -m benchmarks.served_ab --a-tree /tmp/base --rounds 8
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import tempfile

from benchmarks.compare_peers import WORKLOADS
from benchmarks.load.datasets import load_tokenizer
from benchmarks.peers import xyserve_spec
from benchmarks.served_overhead import served_tok_s

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a-tree", required=True, type=pathlib.Path,
                        help="the A side's source tree (a checkout of another commit)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workload", default="decode-heavy", choices=[w.name for w in WORKLOADS])
    args = parser.parse_args()

    workload = next(w for w in WORKLOADS if w.name == args.workload)
    tokenizer = load_tokenizer(MODEL)
    a_spec = dataclasses.replace(xyserve_spec(MODEL, args.dtype, name="A"),
                                 env=(("PYTHONPATH", str(args.a_tree.resolve())),))
    b_spec = xyserve_spec(MODEL, args.dtype, name="B")
    tok_s: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as logs, \
            a_spec.start(pathlib.Path(logs)) as a, b_spec.start(pathlib.Path(logs)) as b:
        for round_no in range(args.rounds):
            order = (("A", a), ("B", b)) if round_no % 2 == 0 else (("B", b), ("A", a))
            for side, server in order:
                tok_s[side].append(served_tok_s(server, workload, tokenizer, 1000 * round_no))
            print(f"round {round_no}: A {tok_s['A'][-1]:7.1f} tok/s, B {tok_s['B'][-1]:7.1f} "
                  f"tok/s", flush=True)
    ratios = [b_tok_s / a_tok_s for a_tok_s, b_tok_s in zip(tok_s["A"], tok_s["B"], strict=True)]
    for side, values in tok_s.items():
        print(f"{side}: median {statistics.median(values):.1f} tok/s")
    print(f"B / A, median of {args.rounds} rounds: {statistics.median(ratios):.3f} "
          f"(B ahead in {sum(r > 1 for r in ratios)} of them)")


if __name__ == "__main__":
    main()
