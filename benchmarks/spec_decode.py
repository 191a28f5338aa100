"""Speculative decoding on this CPU: each drafter against no speculation, echo-heavy and chat.

For each configuration (no speculation, `--speculative ngram`, `tree`, `draft-model` with a
layer-skip copy of the model as draft) starts `xyserve serve --dtype float32` on a free loopback
port, runs the echo-heavy workload (code editing and quote-then-summarise prompts whose answers
repeat the prompt) and the plain chat workload at concurrency 1 and 16 (greedy, chat template,
EOS honoured; the same prompts for every configuration), and reads the spec_decode_* counters
of /metrics before and after each run: acceptance rate, mean accepted length, acceptance per
position. Then, timing only, the simulated NPU time per output token of Llama-2-7B on the default
chip with and without speculation at the measured acceptance (benchmarks.spec_decode_npu).
Prompts and the draft model: benchmarks.spec_decode_workloads.

    .venv/bin/python -m benchmarks.spec_decode              # everything (~15-20 min)
    .venv/bin/python -m benchmarks.spec_decode --quick      # a smoke run (~3 min)
    .venv/bin/python -m benchmarks.spec_decode --configs none ngram --num-speculative-tokens 6

Writes benchmarks/results/<date>-spec-decode.md (+ .json). Prefix caching is off on every
server, so a repeated run (one disturbed by other processes) costs the same prefill. ITL is the
gap between streamed chunks, and a verify step can stream several tokens in one chunk: TPOT is
the per-token figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from benchmarks import RESULTS_DIR
from benchmarks.compare_peers import wait_quiet
from benchmarks.load.client import ClientConfig, run, run_requests
from benchmarks.load.datasets import BenchRequest, load_tokenizer
from benchmarks.load.metrics import client_metrics
from benchmarks.machine import CpuLoad, cpu_info, versions
from benchmarks.peers import free_port, start_server, xyserve_command
from benchmarks.spec_decode_npu import (
    NPU_CONTEXT_TOKENS,
    Acceptance,
    npu_time_per_token,
)
from benchmarks.spec_decode_workloads import (
    chat_requests,
    echo_requests,
    layer_skip_draft,
)

CONFIGS = ("none", "ngram", "tree", "draft-model")
ECHO_TARGET_SPEEDUP = 1.5  # echo-heavy, concurrency 1: output tok/s over no speculation
CHAT_MAX_LOSS = 0.05  # plain chat, concurrency 16: at most this much slower
SPEC_PREFIX = "xyserve:spec_decode_"


@dataclass(frozen=True)
class Workload:
    """One measured run: a prompt set at a concurrency."""

    name: str  # echo-heavy | plain-chat
    concurrency: int  # requests in flight at most
    num_prompts: int
    output_len: int  # max_tokens

    @property
    def key(self) -> str:
        return f"{self.name}@c{self.concurrency}"


WORKLOADS = (
    Workload("echo-heavy", 1, 8, 192), Workload("echo-heavy", 16, 32, 192),
    Workload("plain-chat", 1, 4, 128), Workload("plain-chat", 16, 32, 128),
)


def quick(w: Workload) -> Workload:
    return replace(w, num_prompts=2 if w.concurrency == 1 else 4, output_len=48)


def build_requests(w: Workload, tokenizer: Any) -> list[BenchRequest]:
    if w.name == "echo-heavy":
        return echo_requests(tokenizer, w.num_prompts, w.output_len)
    return chat_requests(tokenizer, w.num_prompts, w.output_len)


def server_args(config: str, num_speculative_tokens: int, draft_dir: pathlib.Path | None,
                ) -> list[str]:
    """`xyserve serve` options of a configuration (beyond model, port and dtype)."""
    args = ["--no-enable-prefix-caching"]
    if config == "none":
        return args
    args += ["--speculative", config, "--num-speculative-tokens", str(num_speculative_tokens)]
    if config == "draft-model":
        if draft_dir is None:
            raise ValueError("draft-model needs a draft directory")
        args += ["--draft-model", str(draft_dir)]
    return args


# ------------------------------------------------------------------------------ metrics


def spec_counters(text: str) -> dict[str, float]:
    """The spec_decode_* counters of a Prometheus exposition, summed over model names, the
    per-position ones kept apart: {"num_drafts": .., "num_accepted_tokens_per_pos/0": ..}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not (s.name.startswith(SPEC_PREFIX) and s.name.endswith("_total")):
                continue
            key = s.name[len(SPEC_PREFIX):-len("_total")]
            if "position" in s.labels:
                key += f"/{s.labels['position']}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def acceptance_between(before: str, after: str, num_decode_tokens: float) -> Acceptance:
    """Acceptance over a run from /metrics texts read before and after it."""
    b, a = spec_counters(before), spec_counters(after)
    delta = {k: v - b.get(k, 0.0) for k, v in a.items()}
    pos = sorted((int(k.split("/")[1]), v) for k, v in delta.items()
                 if k.startswith("num_accepted_tokens_per_pos/"))
    per_pos = [0.0] * (pos[-1][0] + 1 if pos else 0)
    for i, v in pos:
        per_pos[i] = v
    return Acceptance(delta.get("num_drafts", 0.0), delta.get("num_draft_tokens", 0.0),
                      delta.get("num_accepted_tokens", 0.0), tuple(per_pos), num_decode_tokens)


def _metrics_text(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/metrics", timeout=10).text


def measure(url: str, model: str, pid: int, requests: list[BenchRequest], concurrency: int,
            max_foreign_load: float, retries: int) -> dict[str, Any]:
    """Warm up, run `requests` (repeated while other processes took more than max_foreign_load
    of the CPU; the least disturbed attempt is kept); client metrics + acceptance + texts."""
    config = ClientConfig(base_url=url, model=model, temperature=0.0)
    warm = [replace(requests[0], output_len=8)]
    run(run_requests(config, warm, math.inf, 1.0, 1, 0))
    best: dict[str, Any] | None = None
    for _ in range(retries + 1):
        wait_quiet([pid], max_foreign_load)
        before = _metrics_text(url)
        load = CpuLoad([pid])
        load.start()
        results, duration_s = run(run_requests(config, requests, math.inf, 1.0,
                                               concurrency, 0))
        foreign = load.stop()
        out = client_metrics(results, duration_s, (50, 99), {})
        decode_tokens = out["total_output_tokens"] - out["completed"]
        acc = acceptance_between(before, _metrics_text(url), decode_tokens)
        out.update(foreign_cpu_load=foreign, texts=[r.text for r in results],
                   errors=sorted({r.error for r in results if not r.success})[:5],
                   acceptance=acc, acceptance_rate=acc.rate,
                   mean_accepted_length=acc.mean_accepted_length)
        if best is None or foreign < best["foreign_cpu_load"]:
            best = out
        if foreign <= max_foreign_load:
            break
        print(f"    (other processes used {foreign:.0%} of the CPU; again)")
    assert best is not None
    return best


# ------------------------------------------------------------------------------ report


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def ratio(data: dict[str, Any], key: str, config: str) -> float | None:
    """Output tok/s of `config` over no speculation on run `key` (None if either is missing)."""
    runs = data["runs"].get(key, {})
    if config not in runs or "none" not in runs or not runs["none"]["output_throughput"]:
        return None
    return runs[config]["output_throughput"] / runs["none"]["output_throughput"]


def targets(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per drafter: echo-heavy c=1 speedup and plain-chat c=16 ratio, and whether each target
    is met (None where a run is missing)."""
    out = {}
    for config in data["configs"]:
        if config == "none":
            continue
        echo, chat = ratio(data, "echo-heavy@c1", config), ratio(data, "plain-chat@c16", config)
        out[config] = {"echo_c1": echo, "chat_c16": chat,
                       "echo_met": None if echo is None else echo >= ECHO_TARGET_SPEEDUP,
                       "chat_met": None if chat is None else chat >= 1.0 - CHAT_MAX_LOSS}
    return out


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not run"}[met]


def report(data: dict[str, Any]) -> str:
    """The Markdown report of a run (`data` as main() builds it; tests build small ones)."""
    m = data["machine"]
    lines = [f"# Speculative decoding — {data['date']}", "", f"Command: `{data['command']}`", "",
             f"Machine: {m['model']}, {m['cores']} cores, {m['memory_gib']} GiB, torch threads "
             f"{m['torch_threads']}; " + ", ".join(f"{k} {v}" for k, v in
                                                   data["versions"].items()), "",
             f"Model {data['model']} (fp32), K = {data['num_speculative_tokens']} speculative "
             f"tokens, draft model: its first {data['draft_layers']} of "
             f"{data['target_layers']} layers. Greedy, chat template, EOS honoured; prefix "
             "caching off. ITL = gap between streamed chunks (a verify may stream several "
             "tokens at once); TPOT = per output token after the first.", "",
             _row(["workload", "c", "config", "out tok/s", "vs none", "ITL p50 ms",
                   "ITL p99 ms", "TPOT ms", "accept rate", "mean acc. len", "same text",
                   "CPU by others"]), _row(["---"] * 12)]
    for key, runs in data["runs"].items():
        name, c = key.split("@c")
        base_texts = runs.get("none", {}).get("texts")
        for config, r in runs.items():
            spec = config != "none"
            same = (f"{sum(a == b for a, b in zip(r['texts'], base_texts, strict=False))}/"
                    f"{len(base_texts)}" if spec and base_texts else "-")
            lines.append(_row([
                name, c, config, f"{r['output_throughput']:.1f}",
                _fmt(ratio(data, key, config), ".2f") + ("x" if spec else ""),
                f"{r['itl_ms']['p50']:.1f}", f"{r['itl_ms']['p99']:.1f}",
                f"{r['tpot_ms']['mean']:.1f}",
                f"{r['acceptance_rate']:.2f}" if spec else "-",
                f"{r['mean_accepted_length']:.2f}" if spec else "-", same,
                f"{r['foreign_cpu_load']:.0%}"]))
    lines += ["", "## Targets", "",
              f"- echo-heavy, concurrency 1: output tok/s at least {ECHO_TARGET_SPEEDUP}x no "
              "speculation",
              f"- plain chat, concurrency 16: at most {CHAT_MAX_LOSS:.0%} slower than no "
              "speculation (adaptive disabling)", "",
              _row(["drafter", "echo c=1", "target", "chat c=16", "target"]), _row(["---"] * 5)]
    for config, t in targets(data).items():
        lines.append(_row([config, _fmt(t["echo_c1"], ".2f") + "x", _verdict(t["echo_met"]),
                           _fmt(t["chat_c16"], ".2f") + "x", _verdict(t["chat_met"])]))
    if data.get("npu"):
        n0 = data["npu"][0]
        lines += ["", f"## Simulated NPU: {n0['model']} on one {n0['chip']}, timing only", "",
                  f"Context {n0['context']} tokens, batch 1 (acceptance measured at c=1) and 16 "
                  "(at c=16). Verify chunks of 1 + L tokens (L = measured mean draft length); "
                  "'share' = decode slots that verified a draft (adaptive drafting switches "
                  "requests off); 'verify / decode step' = a step in which every request "
                  "verifies over a plain decode step; 'all' = speedup if every slot verified. "
                  "The draft-model rows add the layer-skip draft's own launches (the same "
                  "fraction of the target's layers); ngram / tree host work is not modelled.",
                  "",
                  _row(["workload", "drafter", "batch", "accept rate", "tokens/verify", "L",
                        "share", "verify / decode step", "decode ms/tok", "spec ms/tok",
                        "speedup", "all"]),
                  _row(["---"] * 12)]
        for n in data["npu"]:
            lines.append(_row([n["workload"], n["config"], str(n["batch"]),
                               f"{n['acceptance_rate']:.2f}", f"{1 + n['expected_accepted']:.2f}",
                               str(n["spec_len"]), f"{n['draft_share']:.2f}",
                               f"{n['verify_step_ms'] / n['decode_step_ms']:.2f}",
                               f"{n['decode_ms_per_token']:.3f}", f"{n['spec_ms_per_token']:.3f}",
                               f"{n['speedup']:.2f}x", f"{n['speedup_all']:.2f}x"]))
    return "\n".join(lines) + "\n"


def npu_rows(data: dict[str, Any], draft_layer_fraction: float) -> list[dict[str, Any]]:
    """The simulated-NPU comparison for every measured (workload, drafter) with drafts."""
    rows = []
    for key, runs in data["runs"].items():
        name, c = key.split("@c")
        batch = 1 if int(c) == 1 else 16
        for config, r in runs.items():
            acc: Acceptance = r["acceptance"]
            if config == "none" or not acc.num_drafts:
                continue
            kw: dict[str, Any] = {"tree": config == "tree", "draft_layer_fraction":
                                  draft_layer_fraction if config == "draft-model" else None}
            t = npu_time_per_token(acc, batch, **kw)
            t_all = npu_time_per_token(acc, batch, all_steps_draft=True, **kw)
            rows.append({"workload": name, "config": config, "batch": batch, **t,
                         "speedup_all": t_all["speedup"], "acceptance_rate": acc.rate,
                         "expected_accepted": acc.expected_accepted, "model": "llama-2-7b",
                         "chip": data["npu_chip"], "context": data["npu_context"]})
    return rows


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K")
    parser.add_argument("--draft-layers", type=int, default=6,
                        help="layers of the model kept in the layer-skip draft model")
    parser.add_argument("--draft-dir", type=pathlib.Path, default=None,
                        help="where the draft model is built (default: xyserve's cache dir)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--max-foreign-load", type=float, default=0.15)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    start_s = time.monotonic()

    from engine.config import DEFAULT_NPU
    from engine.models.loader import default_cache_dir, resolve_model_path

    model_dir = resolve_model_path(args.model)
    target_layers = int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
    draft_dir = None
    if "draft-model" in args.configs:
        draft_dir = layer_skip_draft(model_dir, args.draft_layers,
                                     args.draft_dir or default_cache_dir() / "bench")
        print(f"draft model: {draft_dir}")
    tokenizer = load_tokenizer(str(model_dir))
    workloads = [quick(w) for w in WORKLOADS] if args.quick else list(WORKLOADS)
    requests = {w.key: build_requests(w, tokenizer) for w in workloads}
    configs = [c for c in CONFIGS if c in args.configs]
    data: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
        "machine": cpu_info(), "versions": versions(), "model": args.model,
        "num_speculative_tokens": args.num_speculative_tokens, "draft_layers": args.draft_layers,
        "target_layers": target_layers, "configs": configs,
        "runs": {w.key: {} for w in workloads},
        "npu_chip": DEFAULT_NPU, "npu_context": NPU_CONTEXT_TOKENS,
    }
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for config in configs:
        port = free_port()
        command = xyserve_command(args.model, port, "float32",
                                  *server_args(config, args.num_speculative_tokens, draft_dir))
        print(f"starting {config}: {' '.join(command)}", flush=True)
        with start_server(f"spec-{config}", command, port, args.model, log_dir, {},
                          False) as server:
            for w in workloads:
                r = measure(server.url, args.model, server.process.pid, requests[w.key],
                            w.concurrency, args.max_foreign_load, args.retries)
                data["runs"][w.key][config] = r
                print(f"  {w.key}: {r['output_throughput']:.1f} out tok/s, TPOT "
                      f"{r['tpot_ms']['mean']:.1f} ms, acceptance {r['acceptance_rate']:.2f}, "
                      f"mean accepted length {r['mean_accepted_length']:.2f}, failed "
                      f"{r['failed']}", flush=True)
    print("simulated NPU ...", flush=True)
    data["npu"] = npu_rows(data, args.draft_layers / target_layers)
    text = report(data)
    print("\n" + text)
    stem = f"{time.strftime('%Y-%m-%d')}-spec-decode"
    (args.out / f"{stem}.md").write_text(text)
    for runs in data["runs"].values():
        for r in runs.values():
            r["acceptance"] = dataclasses.asdict(r["acceptance"])
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
    print(f"written {args.out / stem}.md and .json ({time.monotonic() - start_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
