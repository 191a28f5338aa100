"""What a simulation keeps while it runs: a row per step, a row per request, every inter-token
gap, NPU time by primitive. All on the simulated clock; plain arrays, no per-token objects."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.workload import RequestSpec
from engine.core import EngineCore
from engine.outputs import RequestOutput

# Per-step columns, in the order of `Recorder.steps` and the per-step CSV.
STEP_COLUMNS = ("step", "end_s", "step_s", "host_s", "num_prompt_tokens",
                "num_generation_tokens", "num_running", "num_waiting", "kv_cache_usage",
                "num_preempted")


@dataclass
class RequestRecord:
    """One request's life on the simulated clock (filled in when it finishes)."""

    index: int  # its position in the workload
    arrival_s: float  # when it arrived
    prompt_len: int  # prompt tokens
    output_len: int  # tokens asked for
    queue_s: float = float("nan")  # arrival -> first scheduled
    ttft_s: float = float("nan")  # arrival -> first token
    e2e_s: float = float("nan")  # arrival -> last token
    num_output_tokens: int = 0  # tokens generated
    finish_reason: str = ""  # "length" once finished

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (nan with a single token)."""
        if self.num_output_tokens < 2:
            return float("nan")
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


class Recorder:
    """Collects a simulation's results from the engine, step by step."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, ...]] = []  # STEP_COLUMNS rows
        self.requests: dict[int, RequestRecord] = {}  # by workload index
        self.itls_s = array("d")  # every inter-token gap of every request
        self.kernel_s: Counter[str] = Counter()  # NPU seconds by primitive
        self.device_s = 0.0  # NPU seconds in kernels, all steps
        self.host_s = 0.0  # modelled host overhead, all steps
        self.max_kv_usage = 0.0  # peak fraction of KV blocks in use
        self.num_preemptions = 0  # requests preempted, all steps
        self.wall_s = 0.0  # wall seconds the simulation took (set by the driver)

    def record_arrival(self, index: int, spec: RequestSpec) -> None:
        self.requests[index] = RequestRecord(index, spec.arrival_s, spec.prompt_len,
                                             spec.output_len)

    def record_step(self, core: EngineCore, outputs: Sequence[RequestOutput]) -> None:
        stats = core.last_stats
        if stats is None or stats.trace is None:
            return
        trace = stats.trace
        # The three queue numbers, read directly: a whole make_stats() snapshot per step cost
        # more than the rest of this method
        scheduler = core.scheduler
        kv_cache_usage = scheduler.kv_cache_usage
        self.steps.append((len(self.steps), core.sim_now_s, stats.step_sim_s, trace.host_s,
                           stats.num_prompt_tokens, stats.num_generation_tokens,
                           scheduler.num_running, scheduler.num_waiting, kv_cache_usage,
                           stats.num_preempted_reqs))
        # (fromlist: half the time of extend, which converts a tuple item by item generically)
        self.itls_s.fromlist(list(stats.inter_token_latencies_sim_s))
        kernel_s = self.kernel_s
        for primitive, seconds in trace.kernel_s_by_primitive.items():
            kernel_s[primitive] += seconds
        self.device_s += trace.device_s
        self.host_s += trace.host_s
        if kv_cache_usage > self.max_kv_usage:
            self.max_kv_usage = kv_cache_usage
        self.num_preemptions += stats.num_preempted_reqs
        for output in outputs:
            metrics = output.metrics
            if metrics is not None:
                record = self.requests[int(output.request_id)]
                record.queue_s = metrics.queue_sim_s
                record.ttft_s = metrics.ttft_sim_s
                record.e2e_s = metrics.e2e_sim_s
                record.num_output_tokens = metrics.num_output_tokens
                record.finish_reason = output.finish_reason.value if output.finish_reason else ""
