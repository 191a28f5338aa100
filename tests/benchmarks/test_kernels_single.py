"""`xyserve kernels gemm` / `xyserve kernels attention`: one kernel's simulated time, its JSON
fields, the policies, --num-cores, and the error paths (one line, exit 2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.cli import main

FIELDS = {"time_us", "tflops", "hbm_bytes", "num_tasks", "num_waves"}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["kernels", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_gemm_json_fields_and_flops(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, "gemm", "--m", "4096", "--n", "4096", "--k", "4096")
    assert set(r) >= FIELDS and (r["m"], r["n"], r["k"]) == (4096, 4096, 4096)
    assert r["tflops"] == pytest.approx(2 * 4096**3 / (r["time_us"] * 1e-6) / 1e12)
    assert 200 < r["tflops"] < 354  # below the 910B2's bf16 peak, near CK2's 315
    # each operand read at least once, the output written once (bf16)
    assert r["hbm_bytes"] >= 3 * 4096 * 4096 * 2


def test_w4a16_weights_read_a_third_of_the_bytes_in_a_decode_gemv(
        capsys: pytest.CaptureFixture[str]) -> None:
    shape = ("gemm", "--m", "1", "--n", "11008", "--k", "4096")
    bf16, w4 = run_json(capsys, *shape), run_json(capsys, *shape, "--weights", "w4a16")
    assert w4["weights"] == "w4a16" and w4["hbm_bytes"] < 0.35 * bf16["hbm_bytes"]
    assert w4["time_us"] < 0.7 * bf16["time_us"]


def test_atb_policy_is_torch_mm_and_counts_waves(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, "gemm", "--m", "1024", "--n", "1024", "--k", "1024", "--policy", "atb")
    # ATB's 128 x 256 tiles: 8 x 4 = 32 tasks, two waves of 24 AICs
    assert (r["num_tasks"], r["num_waves"]) == (32, 2)
    assert [x["name"] for x in r["launches"]] == ["mm"]


def test_bucket_policy_adds_a_pad_copy_and_costs_more(capsys: pytest.CaptureFixture[str]) -> None:
    shape = ("--m", "520", "--n", "12288", "--k", "4096")
    virtual = run_json(capsys, "gemm", *shape)
    bucket = run_json(capsys, "gemm", *shape, "--policy", "bucket")
    assert [x["name"] for x in bucket["launches"]] == ["gemm_pad", "gemm"]
    assert "M=1024" in bucket["launches"][1]["shape"]  # 520 rows padded to the 1024 bucket
    assert bucket["time_us"] > 1.3 * virtual["time_us"]


def test_attention_policies_and_core_restriction(capsys: pytest.CaptureFixture[str]) -> None:
    batch = ("attention", "--query-lens", "1,1,512", "--context-lens", "900,3000,0")
    meta = run_json(capsys, *batch)
    split = run_json(capsys, *batch, "--policy", "split")
    assert set(meta) >= FIELDS and meta["kv_tokens"] == 900 + 3000 + 514
    assert len(meta["launches"]) == 1 and len(split["launches"]) == 2  # prefill + decode
    assert split["time_us"] > meta["time_us"]
    few = run_json(capsys, *batch, "--num-cores", "4")
    assert few["npu"] == "910b2/4c" and few["time_us"] > 2 * meta["time_us"]
    assert few["num_waves"] > meta["num_waves"]


def test_attention_takes_heads_from_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, "attention", "--query-lens", "1", "--context-lens", "4096",
                 "--model", "qwen2.5-7b")
    assert (r["num_heads"], r["num_kv_heads"], r["head_size"]) == (28, 4, 128)
    # decode reads the whole KV cache once: 4097 tokens x 4 KV heads x (K + V) x 128 x 2 bytes
    assert r["hbm_bytes"] >= 4097 * 4 * 2 * 128 * 2


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernels", "gemm", "--m", "16", "--n", "4096", "--k", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gemm (virtual) on 910b2: ") and "TFLOPS" in out and "waves" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["gemm", "--m", "0", "--n", "8", "--k", "8"], "--m, --n and --k must be at least 1"),
    (["gemm", "--m", "8", "--n", "8", "--k", "8", "--npu", "910x"], "unknown NPU '910x'"),
    (["gemm", "--m", "8", "--n", "8", "--k", "8", "--num-cores", "25"],
     "--num-cores must be in [1, 24]"),
    (["attention", "--query-lens", "1,x"], "--query-lens: expected comma-separated integers"),
    (["attention", "--query-lens", "1,2", "--context-lens", "1,2,3"],
     "--context-lens has 3 values for 2 sequences"),
    (["attention", "--query-lens", "1", "--num-heads", "30", "--num-kv-heads", "8"],
     "need heads divisible by KV heads"),
    (["attention", "--query-lens", "1", "--model", "gpt-5"], "unknown model 'gpt-5'"),
])
def test_errors_are_one_line(argv: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernels", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"xyserve kernels {argv[0]}: error: ")
    assert message in err


def test_sweep_is_still_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["kernels", "--help"], ["kernels", "sweep", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        assert "--quick" in capsys.readouterr().out
