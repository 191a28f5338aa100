"""benchmarks.compare_peers' parts that need no server: the attainable bound, finding the peers
setup.sh built, reading xyserve's fast path from its log, and the report's ratios."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from benchmarks.compare_report import report
from benchmarks.machine import BYTES_PER_WEIGHT, ModelFlops
from benchmarks.peers import Server, peer_spec, xyserve_fast_path

FLOPS = ModelFlops(per_token=0.2, lm_head=0.1)  # GFLOP: 0.15 G weights


def test_attainable_rate_is_the_slower_of_compute_and_weight_streaming() -> None:
    # memory-bound: 8 prompts x 100 out at concurrency 4 = 200 steps, each reading 0.6 GB
    # (fp32) at 10 GB/s = 12 s, against 8 x 110 x 0.2 + 800 x 0.1 = 256 GFLOP at 1000 GFLOP/s
    rate = FLOPS.attainable_output_rate(8, 10, 100, 4, peak_gflops=1000, read_gbs=10,
                                        bytes_per_weight=BYTES_PER_WEIGHT["fp32"])
    assert rate == pytest.approx(800 / 12.0)
    # 4-bit weights stream 6.4x faster: compute-bound at 0.256 s
    rate = FLOPS.attainable_output_rate(8, 10, 100, 4, peak_gflops=1000, read_gbs=10,
                                        bytes_per_weight=BYTES_PER_WEIGHT["gguf"])
    assert rate == pytest.approx(800 / max(0.256, 200 * 0.15 * 0.625 / 10))


def test_peers_are_found_where_setup_built_them(tmp_path: pathlib.Path) -> None:
    assert peer_spec("llama.cpp", tmp_path) is None  # not built: skipped, not an error
    for script in ("serve-llama.sh", "serve-vllm.sh", "serve-transformers.sh"):
        (tmp_path / script).write_text("#!/bin/sh\n")
    vllm = peer_spec("vllm-bfloat16", tmp_path)
    assert vllm is not None and vllm.command[1:] == ("{port}", "bfloat16")
    assert vllm.model == "smollm2" and vllm.ignore_eos
    hf = peer_spec("transformers", tmp_path)
    assert hf is not None and not hf.ignore_eos and dict(hf.extra_body)["generation_config"]
    with pytest.raises(ValueError, match="unknown peer"):
        peer_spec("tgi", tmp_path)


@pytest.mark.parametrize(("line", "expected"), [
    ("engine ready: smollm2, float32 activations, q4_1+q8_0 weights (measured ...)",
     ("float32", "gguf")),
    ("engine ready: smollm2, bfloat16 activations, bf16 weights (as configured)",
     ("bfloat16", "bf16")),
    ("engine ready: smollm2, float32 activations, bf16+q4_1+q8_0 weights (measured ...)",
     ("float32", "gguf+bf16")),
    ("no such line", ("float32", "fp32")),
])
def test_xyserve_fast_path_from_its_log(tmp_path: pathlib.Path, line: str,
                                        expected: tuple[str, str]) -> None:
    log = tmp_path / "xyserve.log"
    log.write_text(f"INFO xyserve: {line}\n")
    process = subprocess.Popen(["true"])
    process.wait()
    server = Server("xyserve-auto", "http://127.0.0.1:1", "m", process, log, {}, True)
    assert xyserve_fast_path(server) == expected


def _run(output_tps: float, itl_ms: float) -> dict[str, object]:
    return {"output_throughput": output_tps, "total_token_throughput": 2 * output_tps,
            "ttft_ms": {"p50": 100.0}, "itl_ms": {"p50": itl_ms, "p99": 2 * itl_ms},
            "attainable_output_throughput": 400.0, "bound_fraction": output_tps / 400,
            "foreign_cpu_load": 0.0}


def test_report_turns_ratios_so_that_above_one_means_xyserve_is_better() -> None:
    servers = ["xyserve-auto", "llama.cpp", "vllm-float32"]
    data = {
        "date": "today", "command": "python -m benchmarks.compare_peers",
        "machine": {"model": "cpu", "cores": 2, "memory_gib": 24, "torch_threads": 2,
                    "flags": ["avx2"]},
        "versions": {"torch": "x"}, "gemm": {"fp32_roofline": 100.0},
        "memory_read_gbs": 10.0, "flops": {"per_token": 0.2, "lm_head": 0.1},
        "servers": servers,
        "server_info": {s: {"dtype": "float32", "weight_format": "fp32",
                            "is_xyserve": s.startswith("xyserve")} for s in servers},
        "workloads": ["decode-heavy"],
        "workload_specs": {"decode-heavy": {"num_prompts": 32, "input_len": 15,
                                            "output_len": 128, "concurrency": 16}},
        "runs": {"decode-heavy": {"xyserve-auto": _run(300, 20), "llama.cpp": _run(150, 40),
                                  "vllm-float32": _run(200, 50)}},
    }
    text = report(data)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ")}
    assert rows["output tok/s"].rstrip(" |").endswith("1.50x")  # 300 / the best peer's 200
    assert rows["ITL p50 ms"].rstrip(" |").endswith("2.00x")  # the best peer's 40 ms / 20 ms
    assert "xyserve-auto vs best peer" in text


def _mixed_run(itl_p99_ms: float, itl_max_ms: float | None) -> dict[str, object]:
    run = {"itl_p50_ms": 50.0, "itl_p99_ms": itl_p99_ms, "itl_p99_over_p50": itl_p99_ms / 50,
           "decode_output_throughput": 90.0, "long_prompt_ttft_p50_ms": 8000.0,
           "num_long_prompts": 8, "long_prompt_tokens": 1000, "foreign_cpu_load": 0.0}
    if itl_max_ms is not None:
        run["itl_max_ms"] = itl_max_ms
    return run


def test_mixed_load_table_shows_the_worst_gap_that_p99_hides() -> None:
    data = {
        "date": "today", "command": "c", "machine": {"model": "cpu", "cores": 2,
                                                     "memory_gib": 24, "torch_threads": 2,
                                                     "flags": []},
        "versions": {}, "gemm": {"fp32_roofline": 100.0}, "memory_read_gbs": 10.0,
        "flops": {"per_token": 0.2, "lm_head": 0.1}, "servers": [], "server_info": {},
        "workloads": [], "workload_specs": {}, "runs": {},
        "mixed": {"token_budget@256@1": _mixed_run(739.2, 930.0),
                  "prefill_first@256@1": _mixed_run(109.8, 18650.0),
                  "prefill_first@256@2": _mixed_run(96.1, None)},  # an older results file
    }
    rows = [line.split("|")[1:-1] for line in report(data).splitlines()
            if line.startswith("| ") and "@" not in line]
    header = [cell.strip() for cell in rows[0]]
    worst = header.index("worst ITL ms")
    by_run = {(r[0].strip(), r[2].strip()): r[worst].strip() for r in rows[2:]}
    assert by_run == {("token_budget", "1"): "930", ("prefill_first", "1"): "18650",
                      ("prefill_first", "2"): "-"}


@pytest.mark.parametrize("amx", [False, True])
def test_the_bound_counts_the_bytes_gguf_bf16_streams(monkeypatch: pytest.MonkeyPatch,
                                                      amx: bool) -> None:
    """gguf+bf16 streams its 4-bit blocks at one row, and at a batch's rows where AMX reads
    them as its bf16 weights; bf16 panels otherwise: the bound is the format's it reads."""
    import benchmarks.compare_peers as cp

    monkeypatch.setattr(cp.native, "amx_granted", lambda: amx)
    data = {"gemm": {"fp32_roofline": 400.0, "bf16_roofline": 3000.0}, "memory_read_gbs": 30.0}
    flops = ModelFlops(0.212, 0.057)
    for w in cp.WORKLOADS:
        blocks = w.concurrency == 1 or amx
        assert cp.bound(data, w, "gguf+bf16", flops) == cp.bound(
            data, w, "gguf" if blocks else "bf16", flops), w.name


def test_a_mixed_load_run_drives_the_client_and_reads_its_streams(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """mixed_load end to end with the HTTP client and the CPU probes faked: the run number
    seeds the prompts and nothing it is called with shadows the client's `run` (a run number
    named `run` once made every mixed-load run a TypeError)."""
    from types import SimpleNamespace

    from benchmarks import compare_peers
    from benchmarks.load.client import RequestResult

    seeds: list[int] = []

    def requests(tokenizer: object, n: int, prompt_len: int, output_len: int,
                 seed: int) -> list[SimpleNamespace]:
        seeds.append(seed)
        return [SimpleNamespace(prompt_len=prompt_len, output_len=output_len)] * n

    async def send_all(config: object, reqs: list[SimpleNamespace], *args: object,
                       **kwargs: object) -> tuple[list[RequestResult], float]:
        return [RequestResult(r.prompt_len, r.output_len, success=True, ttft_s=0.05,
                              e2e_s=0.05 + 0.01 * (r.output_len - 1),
                              itls_s=[0.01] * (r.output_len - 1)) for r in reqs], 1.0

    class Load:
        def __init__(self, pids: list[int]) -> None: ...
        def start(self) -> None: ...
        def stop(self) -> float: return 0.0

    monkeypatch.setattr(compare_peers, "random_requests", requests)
    monkeypatch.setattr(compare_peers, "run_requests", send_all)
    monkeypatch.setattr(compare_peers, "wait_quiet", lambda pids, load: None)
    monkeypatch.setattr(compare_peers, "CpuLoad", Load)
    server = SimpleNamespace(url="http://x", model="m", extra_body={},
                             process=SimpleNamespace(pid=1))
    out = compare_peers.mixed_load(server, None, 0.1, 3)  # type: ignore[arg-type]
    assert seeds == [31, 32]
    assert out["itl_p50_ms"] == pytest.approx(10.0) and out["num_long_prompts"] == 2
