"""Experiments, not product: every measurement of xyserve lives here, outside the packages it
measures (`engine`, `server`, `npu_sim`).

- `load`: `xyserve bench`, a load generator for any OpenAI-compatible server (over HTTP only);
- `kernels`: `xyserve kernels`, the meta primitives against their baselines on the simulated NPU
  (sweeps, plots, and the timing harness for hand-made batches);
- modules run as scripts (`python -m benchmarks.<name>`): `compare_peers` (xyserve against other
  servers side by side), `offline_throughput`, `cpu_kernels`, `spec_decode`;
- `results/`: each measured run, with its command and machine.
"""

import pathlib

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"  # measured runs (Markdown + JSON)
