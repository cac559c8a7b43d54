"""The engine profile cache: keyed by the host, reused, never trusted past its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.app.tune.fingerprint import HostFingerprint, cpu_model_and_flags
from compressor.app.tune.forms import FORMS, legal_forms
from compressor.app.tune.profile import load_profile, profile_linears
from compressor.targets import get_target

HOST = HostFingerprint(cpu="AMD EPYC", isa=("avx", "avx2"), engine="onnxruntime 1.32.0", threads=2)


class CountingTimer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int]] = []

    def __call__(self, k, n, b, s, forms, threads) -> dict[str, float]:
        self.calls.append((k, n, b, s))
        out = {"float": 10.0, "float/ratio": 1.0, "float_twin": 10.1, "float_twin/ratio": 1.01}
        for f in forms:
            out[f.name] = 7.0
            out[f"{f.name}/ratio"] = 0.7
        return out


def _forms(k: int):
    return legal_forms(get_target("cpu"), k, ("float", "int8", "int4_g64"))


def test_a_second_profile_on_the_same_host_skips_the_timing(tmp_path: Path) -> None:
    timer = CountingTimer()
    prof = load_profile(HOST, tmp_path)
    profile_linears(prof, [(384, 1536), (1536, 384), (384, 1536)], [(32, 128), (1, 128)], _forms, timer=timer)
    assert len(timer.calls) == 4  # the repeated shape is timed once
    assert prof.measured == 4 and prof.reused == 0
    again = load_profile(HOST, tmp_path)
    timer2 = CountingTimer()
    profile_linears(again, [(384, 1536), (1536, 384)], [(32, 128), (1, 128)], _forms, timer=timer2)
    assert timer2.calls == []
    assert again.reused == 4
    assert again.ratio(384, 1536, 32, 128, "int8") == pytest.approx(0.7)
    # a form not timed before is timed for that shape only
    profile_linears(
        again,
        [(384, 1536)],
        [(32, 128)],
        lambda k: legal_forms(get_target("cpu"), k, ("int8_per_token",)),
        timer=timer2,
    )
    assert timer2.calls == [(384, 1536, 32, 128)]


@pytest.mark.parametrize(
    "change",
    [
        {"isa": ("avx", "avx2", "avx512_vnni")},
        {"engine": "onnxruntime 1.33.0"},
        {"threads": 4},
        {"cpu": "Intel Xeon"},
    ],
)
def test_a_fingerprint_change_invalidates_the_profile(tmp_path: Path, change: dict) -> None:
    prof = load_profile(HOST, tmp_path)
    profile_linears(prof, [(384, 384)], [(32, 128)], _forms, timer=CountingTimer())
    other = HostFingerprint(**{**HOST.__dict__, **change})
    assert other.key != HOST.key
    fresh = load_profile(other, tmp_path)
    assert fresh.linears == {}
    timer = CountingTimer()
    profile_linears(fresh, [(384, 384)], [(32, 128)], _forms, timer=timer)
    assert len(timer.calls) == 1


def test_a_tampered_or_corrupt_cache_file_is_ignored(tmp_path: Path) -> None:
    prof = load_profile(HOST, tmp_path)
    profile_linears(prof, [(384, 384)], [(32, 128)], _forms, timer=CountingTimer())
    assert prof.path is not None
    data = json.loads(prof.path.read_text())
    data["fingerprint"]["key"] = "0" * 16  # a file renamed from another host
    prof.path.write_text(json.dumps(data))
    assert load_profile(HOST, tmp_path).linears == {}
    prof.path.write_text("{not json")
    assert load_profile(HOST, tmp_path).linears == {}


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx avx2 avx512f avx512_vnni amx_int8\n"
    )
    name, isa = cpu_model_and_flags(info)
    assert name == "Test CPU"
    assert isa == ("amx_int8", "avx", "avx2", "avx512_vnni", "avx512f")


def test_legal_forms_follow_the_target_and_the_shape() -> None:
    cpu = [f.name for f in legal_forms(get_target("cpu"), 384)]
    assert "int8" in cpu and "int4_g128" in cpu and "2:4" in cpu
    assert [f.name for f in legal_forms(get_target("cpu"), 96)] == [
        n for n in FORMS if n not in ("int4_g64", "int4_g128")
    ]


def test_a_rotation_the_control_calls_noisy_is_timed_again(tmp_path: Path) -> None:
    calls = []

    def timer(k, n, b, s, forms, threads) -> dict[str, float]:
        calls.append(1)
        noisy = len(calls) == 1
        return {"float": 10.0, "float/ratio": 1.0, "float_twin/ratio": 1.2 if noisy else 1.01,
                "int8": 7.0, "int8/ratio": 1.1 if noisy else 0.7}  # fmt: skip

    prof = load_profile(HOST, tmp_path)
    profile_linears(prof, [(384, 384)], [(32, 128)], _forms, timer=timer)
    assert len(calls) == 2
    assert prof.ratio(384, 384, 32, 128, "int8") == pytest.approx(0.7)
