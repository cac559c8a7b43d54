from __future__ import annotations

import pytest

from compressor.errors import PlanError
from compressor.targets import TARGETS, format_targets_table, get_target


def test_records_say_what_is_legal() -> None:
    assert get_target("h100").supports("fp8")
    for name in ("a100", "orin", "cpu"):
        assert not get_target(name).supports("fp8")
    assert get_target("orin").build_on_device and not get_target("a100").build_on_device
    assert get_target("a100").compute_capability == (8, 0)
    assert get_target("orin").compute_capability == (8, 7)
    assert get_target("h100").compute_capability == (9, 0)
    assert not get_target("cpu").sparse_24 and all(TARGETS[t].sparse_24 for t in ("a100", "h100", "orin"))
    for t in TARGETS.values():
        for precision, dense in t.peak_tflops.items():
            if precision in t.sparse_peak_tflops:
                assert t.sparse_peak_tflops[precision] == pytest.approx(2 * dense, rel=0.01)


@pytest.mark.parametrize("target", ["a100", "orin", "cpu"])
def test_fp8_refused_with_a_useful_message(target: str) -> None:
    with pytest.raises(PlanError, match=rf"fp8 is not supported on target '{target}'.*use target h100"):
        get_target(target).require_precision("fp8", "quantize.method")


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(PlanError, match="known targets: cpu, a100, h100, orin"):
        get_target("tpu")


def test_table_lists_every_target() -> None:
    table = format_targets_table()
    for name in TARGETS:
        assert name in table
    assert "sm_87" in table and "on device" in table
