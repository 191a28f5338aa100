"""Host and runtime overhead of a serving stack, as a model: per step, per request in the batch and
per kernel launch, in named stack profiles (`--stack`).

A step's simulated time is

    sim_s = per_step_s + per_request_s x requests + max(device_s, launch_s)

with launch_s = launches x launch_factor x per_launch_s for a stack that issues its kernels one by
one (each dispatch costs host time; the device runs the queue behind it, so the host is hidden
until it is the slower of the two), or launch_s = graph_launch_s for a stack that replays a
captured graph. `launch_factor` is how many launches the stack makes per kernel of this
simulator's fused lowering (an eager Hugging Face layer runs ~4x as many ops as our ~10 fused
kernels). The per-step and per-request terms are what the device never overlaps: scheduling, input
preparation, sampling, output processing, the host-device sync of each step. `StepTrace.host_s`
is the host time the step exposes, sim_s - device_s.

Sources (calibration rows of research/npu-calibration.md; everything else is marked assumed):
- TORCH_NPU_OP_DISPATCH_S, one torch_npu op dispatched from Python: CK2's 1024^3 bf16 torch.mm at
  99.9 TFLOPS is 21.5 us per call in a loop of 30 calls timed by wall clock with one sync; the
  simulated device takes 19.1 us for it (launch included), so the loop is host-bound and a
  dispatch costs 21.5 us (fitted there; every larger CK2 shape is device-bound).
- eager (HF transformers `generate`, torch_npu eager; CE3): Llama-2-7B batch 1 at 16.6 tok/s is
  60.2 ms per token. Its decode step runs 1333 ATen ops that launch kernels (counted with a
  TorchDispatchMode over LlamaForCausalLM.generate, transformers 5.24 on CPU: 36 per layer and 49
  per step in fp32, plus the two fp16 <-> fp32 casts of each RMSNorm and of the rotary cos / sin
  on the NPU: 40 x 32 + 53), against 323 launches of this simulator's lowering: launch_factor
  1333 / 323. The device needs ~9 ms of the 60, so the step is host-bound: 60.2 ms / 1333 =
  45.2 us per op (fitted on CE3), of which 21.5 us is the dispatch (above) and 23.7 us HF's
  Python around it (modules, hooks, generate's bookkeeping). No separate per-step term: the
  generate loop's own ops are among the 1333.
- vllm-ascend (v0.9.1, CE1) and mindie (MindIE 2.1.RC1, CE2): each stack's per_request_s is
  FITTED END TO END on its row's output throughput: Qwen3-8B on a 910B2 serving 1000
  ShareGPT-like prompts sent at once through `xyserve simulate` with the stack's serving
  defaults (benchmarks.e2e_calibration, which says what the workload and the defaults are;
  `python -m benchmarks.e2e_calibration --fit` refits). Every other term is held at the value
  below; the fit does not touch the published latencies, which come out as checks (CE1's mean
  TPOT and TTFT, CE2's median ITL: benchmarks/results/*-npu-fidelity.md). At this scale the
  per-sequence host work dominates: sampling over a 152k vocabulary with the model's default
  top-k / top-p (Qwen3's generation config), input preparation, detokenization and streaming.
  - vllm-ascend: kernels dispatched from Python at the torch_npu cost, ~12 launches per layer
    against our 10 (Qwen3's q / k norms, a separate rotary): launch_factor 1.2. (v0.9.1 runs
    Qwen models in piecewise ACLGraph by default, which replays most of those launches from a
    graph; for an 8B model the launches, ~9 ms a step, hide behind the device's >= 15 ms
    either way, so the choice does not move CE1.) per_step_s 2 ms [assumed: the vLLM V1
    scheduler and prepare_inputs]; per_request_s 0.427 ms [fit: CE1, 1512 output tok/s].
  - mindie: the model is an ATB graph launched once per step [graph_launch_s 0.5 ms, assumed];
    per_step_s 1 ms [assumed, C++ scheduler]; per_request_s 0.124 ms [fit: CE2, 2711 output
    tok/s].
- xyserve (this system's runtime, the default): XY-Serve launches the forward from one C++
  function (XYS 5), so a launch costs a C++ runtime call, 3 us [assumed: aclrtLaunchKernel-class
  host cost]; per_step_s 1 ms [assumed: a vLLM-class Python scheduler step, the previous fixed
  host overhead]; per_request_s 10 us [assumed: per-sequence bookkeeping and sampling on the
  host]. No calibration row measures XY-Serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TORCH_NPU_OP_DISPATCH_S = 21.5e-6  # [fit: CK2 1024^3] one torch_npu op from Python
HF_EAGER_STEP_OPS = 40 * 32 + 53  # [measured] kernel-launching ATen ops, Llama-2-7B decode step
LOWERED_STEP_LAUNCHES = 323  # this simulator's launches for the same step (engine.lowering)
CE3_S_PER_TOKEN = 1 / 16.6  # [CE3] HF eager Llama-2-7B batch 1
VLLM_ASCEND_PER_REQUEST_S = 0.427e-3  # [fit: CE1 output throughput, end to end]
MINDIE_PER_REQUEST_S = 0.1236e-3  # [fit: CE2 output throughput, end to end]


@dataclass(frozen=True)
class HostProfile:
    """One serving stack's host and runtime overhead (see the module docstring)."""

    name: str  # the --stack name
    per_step_s: float  # fixed host time of every step, never overlapped with the device
    per_request_s: float  # host time per request in the step's batch
    per_launch_s: float  # host time to issue one launch (stacks that launch one by one)
    launch_factor: float  # the stack's launches per kernel of this simulator's lowering
    graph_launch_s: float  # host time to replay a captured graph, per step (graph stacks)
    graph_captured: bool  # launches replayed from a graph: per_launch_s is not paid
    source: str  # where the numbers come from, in a line

    def __post_init__(self) -> None:
        for name in ("per_step_s", "per_request_s", "per_launch_s", "launch_factor",
                     "graph_launch_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.name}: {name} must be a finite number >= 0, got "
                                 f"{value!r}")

    def describe(self) -> str:
        """The profile in a line (serve's startup log, simulate's results)."""
        if self.graph_captured:
            launches = f"one graph replay {self.graph_launch_s * 1e3:g} ms"
        else:
            launches = (f"{self.per_launch_s * 1e6:.3g} us per launch x{self.launch_factor:.3g}")
        return (f"{self.name}: {self.per_step_s * 1e3:g} ms per step + "
                f"{self.per_request_s * 1e6:.3g} us per request, {launches} behind the device "
                f"({self.source})")

    def launch_s(self, num_launches: int) -> float:
        """Host time to issue a step's `num_launches` kernels."""
        if self.graph_captured:
            return self.graph_launch_s if num_launches else 0.0
        return num_launches * self.launch_factor * self.per_launch_s

    def step_s(self, device_s: float, num_launches: int, num_requests: int) -> float:
        """The step's simulated time: its device time behind the host's (see the module
        docstring); 0 for a step that launched nothing."""
        if not num_launches:
            return 0.0
        return (self.per_step_s + self.per_request_s * num_requests
                + max(device_s, self.launch_s(num_launches)))


_EAGER_PER_LAUNCH_S = CE3_S_PER_TOKEN / HF_EAGER_STEP_OPS  # 45.2 us, [fit: CE3]

STACKS: dict[str, HostProfile] = {
    "eager": HostProfile(
        name="eager", per_step_s=0.0, per_request_s=0.0, per_launch_s=_EAGER_PER_LAUNCH_S,
        launch_factor=HF_EAGER_STEP_OPS / LOWERED_STEP_LAUNCHES, graph_launch_s=0.0,
        graph_captured=False,
        source="HF transformers eager on torch_npu: per launch fitted on CE3 (60.2 ms / 1333 "
               "ops), 21.5 us of it the op dispatch fitted on CK2 1024^3"),
    "vllm-ascend": HostProfile(
        name="vllm-ascend", per_step_s=2e-3, per_request_s=VLLM_ASCEND_PER_REQUEST_S,
        per_launch_s=TORCH_NPU_OP_DISPATCH_S, launch_factor=1.2, graph_launch_s=0.0,
        graph_captured=False,
        source="per request fitted on CE1 end to end (1512 output tok/s, "
               "benchmarks.e2e_calibration); dispatch fitted on CK2 1024^3; per-step term "
               "assumed"),
    "mindie": HostProfile(
        name="mindie", per_step_s=1e-3, per_request_s=MINDIE_PER_REQUEST_S, per_launch_s=0.0,
        launch_factor=1.0, graph_launch_s=0.5e-3, graph_captured=True,
        source="per request fitted on CE2 end to end (2711 output tok/s, "
               "benchmarks.e2e_calibration); graph replay and per-step terms assumed"),
    "xyserve": HostProfile(
        name="xyserve", per_step_s=1e-3, per_request_s=10e-6, per_launch_s=3e-6,
        launch_factor=1.0, graph_launch_s=0.0, graph_captured=False,
        source="assumed: C++ launches (XYS 5), a Python scheduler step, per-sequence "
               "bookkeeping; no calibration row measures XY-Serve"),
}
DEFAULT_STACK = "xyserve"


def get_stack(name: str | HostProfile) -> HostProfile:
    """The profile called `name` (case-insensitive), or `name` itself if it is a profile;
    ValueError listing the stacks otherwise."""
    if isinstance(name, HostProfile):
        return name
    try:
        return STACKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown stack {name!r}; known: {', '.join(STACKS)}") from None
