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
