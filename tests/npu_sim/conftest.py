"""npu_sim tests run many tiny torch ops: one intra-op thread is faster than a pool whose idle
workers spin, and much faster when the machine is busy. Restored after each module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["native", "aten"])
def cpu_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the C kernels of the fast path ("native"; skipped where they cannot be
    built) and with its ATen fallback ("aten")."""
    from npu_sim.kernels import native

    if request.param == "native":
        if native.lib() is None:
            pytest.skip("the C kernels cannot be built here")
        yield "native"
    else:
        with native.disabled():
            yield "aten"
