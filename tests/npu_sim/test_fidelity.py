"""The calibration rows as regression tests (benchmarks/npu_fidelity.py prints the full table):
kernel rows within +-10%, collectives within +-20% (one fitted efficiency for six points),
CE3 within +-20%, and CE1 / CE2 end to end (~30 s of simulation): the throughput their stack
profiles were fitted on within 1%, the latencies the fit never saw within +-20%."""

from __future__ import annotations

import pytest

import benchmarks.npu_fidelity as fidelity
from benchmarks.npu_fidelity import (
    CK1,
    CK2,
    Row,
    collective_rows,
    e2e_rows,
    kernel_rows,
    simulated_rows,
)
from npu_sim.hardware import get_chip

B2 = get_chip("910b2")


@pytest.fixture(scope="module")
def ck_rows() -> list[Row]:
    with pytest.MonkeyPatch.context() as patch:  # CK3's grid of shapes is the slow part
        patch.setattr(fidelity, "ck3_best", lambda chip, dtype: (1.0, (1, 1, 1)))
        return [r for r in kernel_rows(B2) if r.row_id != "CK3"]


def test_every_ck1_ck2_row_is_modelled_within_10_percent(ck_rows: list[Row]) -> None:
    assert len(ck_rows) == len(CK1) + len(CK2)
    for row in ck_rows:
        assert row.error_pct is not None and abs(row.error_pct) <= 10, (row.what, row.model)


def test_collectives_within_20_percent_and_ce3_within_20() -> None:
    for row in collective_rows(B2):
        assert abs(row.error_pct) <= 20, row.what
    rows = e2e_rows(B2, skip_simulate=True)
    (ce3,) = [r for r in rows if r.row_id == "CE3"]
    assert abs(ce3.error_pct) <= 20
    assert {r.row_id for r in rows if r.model is None} == {"CE1", "CE2"}


def test_ce1_ce2_fitted_throughput_and_unfitted_latencies() -> None:
    rows = simulated_rows()
    assert [(r.row_id, r.unit) for r in rows] == [
        ("CE1", "tok/s"), ("CE1", "s"), ("CE1", "s"), ("CE2", "tok/s"), ("CE2", "s")]
    for row in rows:
        assert row.error_pct is not None
        if row.unit == "tok/s":  # fitted: npu_sim.host's per_request_s came from these
            assert abs(row.error_pct) <= 1, (row.what, row.model)
        else:  # checks
            assert abs(row.error_pct) <= 20, (row.what, row.model)
