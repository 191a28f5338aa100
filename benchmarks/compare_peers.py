"""xyserve side by side with `transformers serve --continuous-batching`: same model files, CPU.

Starts each server in turn on a free loopback port, runs the same workloads against it with the
`xyserve bench` client, and prints a table of ratios; then a mixed-load run (ITL while long
prompts keep arriving: token_budget vs prefill_first) and prefix caching on vs off on the
shared-prefix workload. Writes `benchmarks/results/<date>.md` (+ `.json`) with the machine, the
versions, this machine's measured GEMM roofline and the fraction of it each run reached.

    .venv/bin/python -m benchmarks.compare_peers                # everything (~15 min)
    .venv/bin/python -m benchmarks.compare_peers --quick        # small workloads, a smoke run
    .venv/bin/python -m benchmarks.compare_peers --xyserve-dtypes float32 auto

Both peers run fp32 from the converted default-model directory. Other processes on the machine
skew timings: each run records the share of the CPU used by others, and a run with more than
--max-foreign-load of it is repeated (the least disturbed run is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx

from benchmarks import RESULTS_DIR
from benchmarks.load.client import ClientConfig, RequestResult, run_requests
from benchmarks.load.datasets import (
    BenchRequest,
    load_tokenizer,
    random_requests,
    shared_prefix_requests,
)
from benchmarks.load.metrics import client_metrics, npu_summary, server_metrics_delta
from benchmarks.machine import (
    CpuLoad,
    ModelFlops,
    best_rates,
    cpu_info,
    gemm_rates,
    memory_read_gbs,
    versions,
)


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str  # random | shared-prefix
    num_prompts: int
    input_len: int  # random: prompt tokens; shared-prefix: question tokens
    output_len: int
    concurrency: int
    prefix_len: int = 0  # shared-prefix: the common system prompt


WORKLOADS = (
    Workload("prefill-heavy", "random", 64, 150, 64, 16),
    Workload("decode-heavy", "random", 32, 15, 128, 16),
    Workload("shared-prefix", "shared-prefix", 64, 20, 64, 16, prefix_len=600),
)


def quick(w: Workload) -> Workload:
    return replace(w, num_prompts=max(4, w.num_prompts // 8), output_len=min(w.output_len, 16))


# --------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    url: str
    model: str  # the model name requests carry
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path
    extra_body: dict[str, Any]  # how to ask this server for what we want (no-EOS, greedy)
    ignore_eos: bool  # sends the vLLM-style ignore_eos field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_server(name: str, command: list[str], port: int, model: str, log_dir: pathlib.Path,
                 extra_body: dict[str, Any], ignore_eos: bool,
                 timeout_s: float = 300.0) -> Iterator[Server]:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(name, f"http://127.0.0.1:{port}", model, process, log_path, extra_body,
                    ignore_eos)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}); see {log_path}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become healthy; see {log_path}")
            time.sleep(0.5)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def xyserve_command(model: str, port: int, dtype: str, *extra: str) -> list[str]:
    script = pathlib.Path(sys.executable).with_name("xyserve")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "server"]
    return [*base, "serve", "--model", model, "--port", str(port), "--dtype", dtype,
            "--log-level", "warning", *extra]


def transformers_command(model_dir: str, port: int) -> list[str]:
    script = pathlib.Path(sys.executable).with_name("transformers")
    exe = str(script) if script.exists() else (shutil.which("transformers") or "transformers")
    return [exe, "serve", model_dir, "--continuous-batching", "--device", "cpu",
            "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]


# transformers serve takes no ignore_eos field (422 on unknown fields); a per-request generation
# config with an EOS id no token has does the same there (max_tokens still caps the length).
TRANSFORMERS_NO_EOS = {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False})}


# ------------------------------------------------------------------------------ running


def build(w: Workload, tokenizer: Any, seed: int = 0) -> list[BenchRequest]:
    if w.dataset == "shared-prefix":
        return shared_prefix_requests(tokenizer, w.num_prompts, w.prefix_len, w.input_len,
                                      w.output_len, seed=seed)
    return random_requests(tokenizer, w.num_prompts, w.input_len, w.output_len, seed=seed)


def wait_quiet(pids: list[int], max_foreign_load: float, max_wait_s: float = 180.0) -> float:
    """Wait (up to max_wait_s) for a 2 s window in which other processes use at most
    max_foreign_load of the CPU; returns the last window's load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = CpuLoad(pids)
        load.start()
        time.sleep(2.0)
        foreign = load.stop()
        if foreign <= max_foreign_load or time.monotonic() > deadline:
            return foreign


def _metrics_text(server: Server) -> str | None:
    try:
        r = httpx.get(f"{server.url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


def run_workload(server: Server, make_requests: Callable[[int], list[BenchRequest]],
                 concurrency: int, max_foreign_load: float, retries: int,
                 request_rate: float = math.inf) -> dict[str, Any]:
    """Warm up, then run; repeated while other processes took more than max_foreign_load of the
    CPU (the least disturbed run is kept). Every attempt (and the warm-up) sends new prompts
    (`make_requests(seed)`), so no run finds the previous one's prompts in a prefix cache.
    Returns client metrics + server metrics + the generated texts."""
    config = ClientConfig(base_url=server.url, model=server.model, temperature=0.0,
                          ignore_eos=server.ignore_eos, extra_body=server.extra_body)
    warm = [replace(r, output_len=min(r.output_len, 8)) for r in make_requests(1000)[:2]]
    asyncio.run(run_requests(config, warm, math.inf, 1.0, concurrency, 0))
    best: dict[str, Any] | None = None
    for attempt in range(retries + 1):
        requests = make_requests(attempt)
        wait_quiet([server.process.pid], max_foreign_load)
        before = _metrics_text(server)
        load = CpuLoad([server.process.pid])
        load.start()
        results, duration = asyncio.run(run_requests(config, requests, request_rate, 1.0,
                                                     concurrency, attempt))
        foreign = load.stop()
        after = _metrics_text(server)
        out = client_metrics(results, duration, (50, 90, 99), {})
        out["foreign_cpu_load"] = foreign
        out["seed"] = attempt
        out["texts"] = [r.text for r in results]
        out["errors"] = sorted({r.error for r in results if not r.success})[:5]
        if before and after:
            delta = server_metrics_delta(before, after)
            out["npu"] = npu_summary(delta)
            # tokens served from the prefix cache (computed by no step), where exported
            out["cached_tokens"] = delta["counters"].get("xyserve:prefix_cache_hits_total", 0)
        if best is None or foreign < best["foreign_cpu_load"]:
            best = out
        if foreign <= max_foreign_load:
            break
        print(f"    ({server.name}: other processes used {foreign:.0%} of the CPU; again)")
    assert best is not None
    return best


def mixed_load(server: Server, tokenizer: Any, scale: float, run: int) -> dict[str, Any]:
    """Decodes streaming while long prompts keep arriving: ITL of the decode stream. Each run
    draws new prompts (a repeated long prompt would be served from the prefix cache)."""
    decodes = random_requests(tokenizer, 16, 16, int(160 * scale) or 16, seed=1 + 10 * run)
    longs = random_requests(tokenizer, max(2, int(8 * scale)), 1000, 8, seed=2 + 10 * run)
    config = ClientConfig(base_url=server.url, model=server.model, temperature=0.0,
                          ignore_eos=True, extra_body=server.extra_body)
    asyncio.run(run_requests(config, decodes[:2], math.inf, 1.0, 2, 0))  # warm up
    wait_quiet([server.process.pid], 0.15)
    load = CpuLoad([server.process.pid])
    load.start()

    async def both() -> tuple[list[RequestResult], float, list[RequestResult]]:
        async def later() -> tuple[list[RequestResult], float]:
            await asyncio.sleep(1.0)  # the decodes are streaming by then
            return await run_requests(config, longs, 0.6, 1.0, None, 3)

        (dec, dur), (lng, _) = await asyncio.gather(
            run_requests(config, decodes, math.inf, 1.0, 16, 0), later())
        return dec, dur, lng

    dec, duration, lng = asyncio.run(both())
    foreign = load.stop()
    m = client_metrics(dec, duration, (50, 90, 99), {})
    long_m = client_metrics(lng, duration, (50, 90, 99), {})
    return {"itl_p50_ms": m["itl_ms"]["p50"], "itl_p99_ms": m["itl_ms"]["p99"],
            "itl_p99_over_p50": m["itl_ms"]["p99"] / max(m["itl_ms"]["p50"], 1e-9),
            "decode_output_throughput": m["output_throughput"],
            "long_prompt_ttft_p50_ms": long_m["ttft_ms"]["p50"],
            "num_long_prompts": len(lng), "long_prompt_tokens": longs[0].prompt_len,
            "foreign_cpu_load": foreign}


# ------------------------------------------------------------------------------ report


def roofline_fraction(run: dict[str, Any], flops: ModelFlops, roofline_gflops: float) -> float:
    """Achieved matmul GFLOP/s over the roofline: every prompt and generated token computed once
    (less prefix-cache hits where the server exports them), the LM head once per generated
    token."""
    computed = run["total_input_tokens"] + run["total_output_tokens"] - run.get("cached_tokens", 0)
    work = flops.work(computed, run["total_output_tokens"])
    return work / run["duration_s"] / roofline_gflops


def _memory_bound_lines(data: dict[str, Any]) -> list[str]:
    """What memory bandwidth allows a decode step (decode-heavy runs at concurrency 16)."""
    read_gbs = data.get("memory_read_gbs")
    if not read_gbs:
        return []
    flops = ModelFlops(data["flops"]["per_token"], data["flops"]["lm_head"])
    peak = data["gemm"]["fp32_roofline"]
    bound = flops.decode_bound_gflops(16, peak, read_gbs)
    return [f"- memory: {read_gbs:.1f} GB/s read; a decode step reads all "
            f"{flops.weight_gb(4) * 1000:.0f} MB of fp32 weights once "
            f"(>= {flops.weight_gb(4) / read_gbs * 1000:.1f} ms), so 16 decoding sequences "
            f"reach at most {bound:.0f} GFLOP/s = {bound / peak:.0%} of the fp32 roofline, "
            "whatever the engine (the attainable roofline of decode-heavy)"]


def _metric(run: dict[str, Any], key: str | tuple[str, str]) -> float:
    return run[key[0]][key[1]] if isinstance(key, tuple) else run[key]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report(data: dict[str, Any]) -> str:
    m, v, g = data["machine"], data["versions"], data["gemm"]
    lines = [f"# xyserve vs transformers serve — {data['date']}", "",
             f"Command: `{data['command']}`", "",
             "## Machine", "",
             f"- CPU: {m['model']}, {m['cores']} cores, {m['memory_gib']} GiB; torch threads "
             f"{m['torch_threads']}",
             f"- CPU flags: {' '.join(m['flags'])}",
             "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             "- GEMM 2048^3 (GFLOP/s, the best of a measurement before and one after the runs): "
             + ", ".join(f"{k} {val:.0f}" for k, val in g.items()),
             f"- fp32 roofline: {g['fp32_roofline']:.0f} GFLOP/s (the best fp32 rate above); "
             f"the model costs {data['flops']['per_token']:.3f} GFLOP per computed token + "
             f"{data['flops']['lm_head']:.3f} per sampled token",
             *_memory_bound_lines(data), ""]
    servers = data["servers"]
    head = ["workload", "metric", *servers]
    ratio_cols = [s for s in servers if s != "transformers"]
    head += [f"{s} / transformers" for s in ratio_cols if "transformers" in servers]
    if servers:  # (none when only the mixed-load or prefix-caching parts ran)
        lines += ["## Workloads (concurrency 16, greedy, no EOS stop)", "",
                  _row(head), _row(["---"] * len(head))]
    for w in data["workloads"] if servers else ():
        runs = data["runs"][w]
        for key, label, fmt in (("output_throughput", "output tok/s", "{:.1f}"),
                                ("total_token_throughput", "total tok/s", "{:.1f}"),
                                (("ttft_ms", "p50"), "TTFT p50 ms", "{:.0f}"),
                                (("itl_ms", "p50"), "ITL p50 ms", "{:.1f}"),
                                (("itl_ms", "p99"), "ITL p99 ms", "{:.1f}"),
                                ("roofline_fraction", "fp32 roofline *", "{:.1%}"),
                                ("foreign_cpu_load", "CPU used by others", "{:.0%}")):
            values = {s: _metric(runs[s], key) for s in servers}
            cells = [w, label] + [fmt.format(values[s]) for s in servers]
            if "transformers" in servers:
                base = values["transformers"]
                cells += [f"{values[s] / base:.2f}x" if base else "-" for s in ratio_cols]
            lines.append(_row(cells))
    lines += ["", "\\* matmul GFLOP/s reached over the fp32 roofline, counting every prompt "
                  "token as computed unless the server reports prefix-cache hits (so with "
                  "caching on, shared-prefix counts the cached prefix as if computed)."]
    if data.get("npu"):
        lines += ["", "Simulated NPU (xyserve's /metrics, same runs): mean step / TTFT / ITL ms, "
                      "output tok/s if the NPU ran the steps back to back", ""]
        lines += [_row(["workload", "server", "step", "TTFT", "ITL", "NPU tok/s"]),
                  _row(["---"] * 6)]
        for (w, s), n in data["npu"].items():
            lines.append(_row([w, s, f"{n.get('mean_step_ms', 0):.2f}",
                               f"{n.get('mean_ttft_ms', 0):.2f}", f"{n.get('mean_itl_ms', 0):.2f}",
                               f"{n.get('output_throughput', 0):.0f}"]))
    if data.get("mixed"):
        first = next(iter(data["mixed"].values()))
        lines += ["", "## Mixed load: 16 streaming decodes while long prompts keep arriving", "",
                  f"16 requests (16-token prompts, 160 tokens each) stream while "
                  f"{first['num_long_prompts']} prompts of {first['long_prompt_tokens']} tokens "
                  "arrive at 0.6/s (Poisson); xyserve fp32; ITL of the 16 streams.", "",
                  _row(["policy", "budget", "run", "ITL p50 ms", "ITL p99 ms", "p99 / p50",
                        "decode tok/s", "long-prompt TTFT p50 ms", "CPU used by others"]),
                  _row(["---"] * 9)]
        for name, r in data["mixed"].items():
            policy, budget, run = name.split("@")
            lines.append(_row([policy, budget, run, f"{r['itl_p50_ms']:.1f}",
                               f"{r['itl_p99_ms']:.1f}", f"{r['itl_p99_over_p50']:.2f}",
                               f"{r['decode_output_throughput']:.1f}",
                               f"{r['long_prompt_ttft_p50_ms']:.0f}",
                               f"{r['foreign_cpu_load']:.0%}"]))
    if data.get("apc"):
        a = data["apc"]
        lines += ["", "## Prefix caching on the shared-prefix workload (xyserve fp32)", "",
                  f"{a['on']['completed']} requests, 600-token common prefix, arriving at "
                  f"{data['apc_rate']}/s (Poisson), at most 16 in flight.", "",
                  _row(["caching", "TTFT p50 ms", "TTFT p99 ms", "output tok/s"]),
                  _row(["---"] * 4)]
        for name in ("on", "off"):
            r = a[name]
            lines.append(_row([name, f"{r['ttft_ms']['p50']:.0f}", f"{r['ttft_ms']['p99']:.0f}",
                               f"{r['output_throughput']:.1f}"]))
        lines += ["", f"TTFT p50 off / on: {a['ttft_ratio']:.2f}x; identical outputs: "
                      f"{a['identical']}/{a['total']}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="xyserve preset or HF directory (both servers load its files)")
    parser.add_argument("--xyserve-dtypes", nargs="*", default=["float32"],
                        help="xyserve --dtype values to run (default: float32)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--skip-apc", action="store_true")
    parser.add_argument("--mixed-budget", type=int, default=64,
                        help="token budget (max_num_batched_tokens) of the mixed-load runs")
    parser.add_argument("--mixed-runs", type=int, default=2, help="mixed-load runs per policy")
    parser.add_argument("--apc-rate", type=float, default=1.5,
                        help="Poisson arrival rate (req/s) of the prefix caching on/off runs")
    parser.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    parser.add_argument("--max-foreign-load", type=float, default=0.15)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args()

    from engine.models.loader import load_model, resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    arch = load_model(model_dir).arch
    flops = ModelFlops.of(arch)
    tokenizer = load_tokenizer(model_dir)
    log_dir = pathlib.Path(args.out_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print("measuring this machine's GEMM rates ...")
    data: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
        "machine": cpu_info(), "versions": versions(), "gemm": gemm_rates(),
        "memory_read_gbs": memory_read_gbs(),
        "flops": {"per_token": flops.per_token, "lm_head": flops.lm_head},
        "workloads": [], "runs": {}, "servers": [], "npu": {},
    }
    workloads = [quick(w) for w in WORKLOADS] if args.quick else list(WORKLOADS)
    data["workloads"] = [w.name for w in workloads]

    def maker(w: Workload) -> Callable[[int], list[BenchRequest]]:
        return lambda seed: build(w, tokenizer, seed)

    peers: list[tuple[str, Any]] = []
    for dtype in args.xyserve_dtypes:
        peers.append((f"xyserve-{dtype}", lambda port, d=dtype: (
            xyserve_command(args.model, port, d), args.model, {}, True)))
    if not args.skip_transformers:
        peers.append(("transformers", lambda port: (
            transformers_command(model_dir, port), model_dir, TRANSFORMERS_NO_EOS, False)))
    for name, make in peers:
        port = free_port()
        command, model_name, extra, ignore_eos = make(port)
        print(f"starting {name}: {' '.join(command)}")
        with start_server(name, command, port, model_name, log_dir, extra, ignore_eos) as server:
            data["servers"].append(name)
            for w in workloads:
                print(f"  {w.name} ...", flush=True)
                run = run_workload(server, maker(w), w.concurrency, args.max_foreign_load,
                                   args.retries)
                data["runs"].setdefault(w.name, {})[name] = run
                if run.get("npu"):
                    data["npu"][(w.name, name)] = run["npu"]
                print(f"    {run['output_throughput']:.1f} output tok/s, TTFT p50 "
                      f"{run['ttft_ms']['p50']:.0f} ms, failed {run['failed']}")

    # Measured again after the runs, and the best of both kept: a neighbour's load during the
    # first measurement would otherwise lower the roofline and flatter every fraction.
    print("measuring the GEMM rates again ...")
    data["gemm"] = best_rates(data["gemm"], gemm_rates())
    data["memory_read_gbs"] = max(data["memory_read_gbs"], memory_read_gbs())
    for runs in data["runs"].values():
        for run in runs.values():
            run["roofline_fraction"] = roofline_fraction(run, flops,
                                                         data["gemm"]["fp32_roofline"])

    if not args.skip_mixed:
        data["mixed"] = {}
        scale = 0.25 if args.quick else 1.0
        for policy in ("token_budget", "prefill_first"):
            port = free_port()
            command = xyserve_command(args.model, port, "float32", "--scheduling-policy", policy,
                                      "--max-num-batched-tokens", str(args.mixed_budget))
            with start_server(f"mixed-{policy}", command, port, args.model, log_dir, {},
                              True) as server:
                for run in range(1, args.mixed_runs + 1):
                    print(f"mixed load: {policy}, budget {args.mixed_budget}, run {run} ...",
                          flush=True)
                    data["mixed"][f"{policy}@{args.mixed_budget}@{run}"] = mixed_load(
                        server, tokenizer, scale, run)

    if not args.skip_apc:
        shared = next(w for w in workloads if w.dataset == "shared-prefix")
        apc: dict[str, Any] = {}
        for flag, name in (("--enable-prefix-caching", "on"),
                           ("--no-enable-prefix-caching", "off")):
            port = free_port()
            command = xyserve_command(args.model, port, "float32", flag)
            print(f"shared-prefix, prefix caching {name} ...", flush=True)
            with start_server(f"apc-{name}", command, port, args.model, log_dir, {},
                              True) as server:
                # the same prompts both times (seed 0 first): outputs must be identical;
                # the same offered load (Poisson arrivals), so TTFT is the prefill saved, not
                # the dynamics of a closed loop
                apc[name] = run_workload(server, maker(shared), shared.concurrency,
                                         args.max_foreign_load, args.retries,
                                         request_rate=args.apc_rate)
        pairs = list(zip(apc["on"]["texts"], apc["off"]["texts"], strict=True))
        same_prompts = apc["on"]["seed"] == apc["off"]["seed"]
        apc["identical"] = sum(a == b for a, b in pairs) if same_prompts else "n/a"
        apc["total"] = len(pairs)
        apc["ttft_ratio"] = apc["off"]["ttft_ms"]["p50"] / max(apc["on"]["ttft_ms"]["p50"], 1e-9)
        data["apc"] = apc
        data["apc_rate"] = args.apc_rate

    text = report(data)
    print()
    print(text)
    out = pathlib.Path(args.out_dir)
    stamp = time.strftime("%Y-%m-%d")
    (out / f"{stamp}.md").write_text(text)
    for runs in data["runs"].values():
        for run in runs.values():
            run.pop("texts", None)
    for run in (data.get("apc") or {}).values():
        if isinstance(run, dict):
            run.pop("texts", None)
    data["npu"] = {f"{w}/{s}": n for (w, s), n in data["npu"].items()}
    (out / f"{stamp}.json").write_text(json.dumps(data, indent=2, default=str))
    print(f"written {out / f'{stamp}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
