"""`--dtype auto`: float32 for small models where the C kernels run, else bf16 where the CPU
computes it natively, else float32; explicit names are taken as given."""

from __future__ import annotations

import pytest
import torch

import engine.platform
from engine.config import AUTO_FP32_MAX_PARAMS
from engine.platform import resolve_dtype
from npu_sim.kernels import native


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    monkeypatch.setattr(engine.platform, "cpu_has_native_bf16", lambda: native_bf16)
    big = AUTO_FP32_MAX_PARAMS + 1
    otherwise = torch.bfloat16 if native_bf16 else torch.float32
    assert resolve_dtype("auto", big) == otherwise
    with native.disabled():
        assert resolve_dtype("auto", 1000) == otherwise
    if native.lib() is not None:
        assert resolve_dtype("auto", AUTO_FP32_MAX_PARAMS) == torch.float32


def test_explicit_names() -> None:
    assert resolve_dtype("float32", 10**12) == torch.float32
    assert resolve_dtype("bfloat16", 1) == torch.bfloat16
