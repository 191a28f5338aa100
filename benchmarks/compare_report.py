"""The Markdown report of benchmarks.compare_peers: machine, side-by-side tables with ratios
against the best peer and the attainable bound, the mixed-load and prefix-caching runs."""

from __future__ import annotations

from typing import Any

# (key in a run, label, format, higher is better)
METRICS: tuple[tuple[str | tuple[str, str], str, str, bool], ...] = (
    ("output_throughput", "output tok/s", "{:.1f}", True),
    ("total_token_throughput", "total tok/s", "{:.1f}", True),
    (("ttft_ms", "p50"), "TTFT p50 ms", "{:.0f}", False),
    (("itl_ms", "p50"), "ITL p50 ms", "{:.1f}", False),
    (("itl_ms", "p99"), "ITL p99 ms", "{:.1f}", False),
    ("attainable_output_throughput", "attainable output tok/s *", "{:.0f}", True),
    ("bound_fraction", "share of attainable *", "{:.0%}", True),
    ("foreign_cpu_load", "CPU used by others", "{:.0%}", False),
)
RATIO_METRICS = ("output tok/s", "total tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms")


def _metric(run: dict[str, Any], key: str | tuple[str, str]) -> float:
    return run[key[0]][key[1]] if isinstance(key, tuple) else run[key]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _machine(data: dict[str, Any]) -> list[str]:
    m, v, g = data["machine"], data["versions"], data["gemm"]
    return [f"Command: `{data['command']}`", "", "## Machine", "",
            f"- CPU: {m['model']}, {m['cores']} cores, {m['memory_gib']} GiB; torch threads "
            f"{m['torch_threads']}",
            f"- CPU flags: {' '.join(m['flags'])}",
            "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            "- GEMM 2048^3 (GFLOP/s, the best of a measurement before and one after the runs): "
            + ", ".join(f"{k} {val:.0f}" for k, val in g.items()),
            f"- memory read: {data['memory_read_gbs']:.1f} GB/s; the model costs "
            f"{data['flops']['per_token']:.3f} GFLOP per computed token + "
            f"{data['flops']['lm_head']:.3f} per sampled token", ""]


def _servers(data: dict[str, Any]) -> list[str]:
    lines = ["## Contenders", "", _row(["server", "activations", "GEMM weights"]),
             _row(["---"] * 3)]
    for name in data["servers"]:
        info = data["server_info"][name]
        lines.append(_row([name, info["dtype"], info["weight_format"]]))
    return [*lines, ""]


def _workload_table(data: dict[str, Any], workload: str) -> list[str]:
    servers = data["servers"]
    runs = data["runs"][workload]
    present = [s for s in servers if s in runs]
    peers = [s for s in present if not data["server_info"][s]["is_xyserve"]]
    ours = [s for s in present if data["server_info"][s]["is_xyserve"]]
    head = ["metric", *present] + ([f"{s} vs best peer" for s in ours] if peers else [])
    w = data["workload_specs"][workload]
    lines = [f"### {workload}: {w['num_prompts']} requests, {w['input_len']}-token prompts, "
             f"{w['output_len']} out, concurrency {w['concurrency']}", "",
             _row(head), _row(["---"] * len(head))]
    for key, label, fmt, higher in METRICS:
        values = {s: _metric(runs[s], key) for s in present}
        cells = [label] + [fmt.format(values[s]) for s in present]
        if peers:
            best = (max if higher else min)(values[p] for p in peers)
            for s in ours:
                if label not in RATIO_METRICS or not best or not values[s]:
                    cells.append("")
                else:  # > 1: xyserve is better, whichever way the metric points
                    ratio = values[s] / best if higher else best / values[s]
                    cells.append(f"{ratio:.2f}x")
        lines.append(_row(cells))
    return [*lines, ""]


def _mixed(data: dict[str, Any]) -> list[str]:
    first = next(iter(data["mixed"].values()))
    lines = ["## Mixed load: 16 streaming decodes while long prompts keep arriving", "",
             f"16 requests (16-token prompts, 160 tokens each) stream while "
             f"{first['num_long_prompts']} prompts of {first['long_prompt_tokens']} tokens "
             f"arrive at 0.6/s (Poisson); xyserve {_variant(data)}; ITL of the 16 streams.",
             "",
             _row(["policy", "budget", "run", "ITL p50 ms", "ITL p99 ms", "p99 / p50",
                   "worst ITL ms", "decode tok/s", "long-prompt TTFT p50 ms",
                   "CPU used by others"]),
             _row(["---"] * 10)]
    for name, r in data["mixed"].items():
        policy, budget, run = name.split("@")
        lines.append(_row([policy, budget, run, f"{r['itl_p50_ms']:.1f}",
                           f"{r['itl_p99_ms']:.1f}", f"{r['itl_p99_over_p50']:.2f}",
                           _ms(r.get("itl_max_ms")), f"{r['decode_output_throughput']:.1f}",
                           f"{r['long_prompt_ttft_p50_ms']:.0f}", f"{r['foreign_cpu_load']:.0%}"]))
    return [*lines, ""]


def _variant(data: dict[str, Any]) -> str:
    """The `--dtype[:format]` of the mixed-load and prefix-caching servers (fp32 before it was
    recorded)."""
    return f"--dtype {data.get('served_variant', 'float32')}"


def _ms(value: float | None) -> str:
    """A millisecond cell; "-" for a figure older results files do not have."""
    return "-" if value is None else f"{value:.0f}"


def _apc(data: dict[str, Any]) -> list[str]:
    a = data["apc"]
    lines = [f"## Prefix caching on the shared-prefix workload (xyserve {_variant(data)})", "",
             f"{a['on']['completed']} requests, 600-token common prefix, arriving at "
             f"{data['apc_rate']}/s (Poisson), at most 16 in flight.", "",
             _row(["caching", "TTFT p50 ms", "TTFT p99 ms", "output tok/s"]), _row(["---"] * 4)]
    for name in ("on", "off"):
        r = a[name]
        lines.append(_row([name, f"{r['ttft_ms']['p50']:.0f}", f"{r['ttft_ms']['p99']:.0f}",
                           f"{r['output_throughput']:.1f}"]))
    return [*lines, "", f"TTFT p50 off / on: {a['ttft_ratio']:.2f}x; identical outputs: "
                        f"{a['identical']}/{a['total']}", ""]


def report(data: dict[str, Any]) -> str:
    lines = [f"# xyserve side by side with its peers — {data['date']}", "", *_machine(data)]
    if data["servers"]:
        lines += _servers(data)
        lines += ["## Workloads (greedy, no EOS stop)", ""]
        for workload in data["workloads"]:
            lines += _workload_table(data, workload)
        lines += ["\\* attainable: the output tok/s no engine can beat on this machine with that "
                  "server's weights: every token computed once at the best measured GEMM rate "
                  "(fp32 or bf16), and every decode step (at most `concurrency` sequences) "
                  "reading all GEMM weights once at the measured memory bandwidth "
                  "(benchmarks.machine.ModelFlops.attainable_output_rate). \"vs best peer\": "
                  "xyserve's figure over the best peer's, turned so that > 1 means xyserve is "
                  "better.", ""]
    if data.get("mixed"):
        lines += _mixed(data)
    if data.get("apc"):
        lines += _apc(data)
    return "\n".join(lines)
