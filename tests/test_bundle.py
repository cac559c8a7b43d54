from __future__ import annotations

from pathlib import Path

import pytest

from compressor.bundle import BundleWriter, read_manifest, verify_bundle
from compressor.errors import CompressorError


def test_bundle_is_written_whole(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as b:
        assert b.path is not None and not out.exists()  # nothing visible while writing
        (b.path / "model.onnx").write_bytes(b"\x00onnx")
        b.add_artifacts({"onnx": "model.onnx"})
        b.manifest["name"] = "x"
    manifest = verify_bundle(out)
    assert manifest["artifacts"] == {"onnx": "model.onnx"}
    assert manifest["files"]["model.onnx"]["bytes"] == 5
    assert len(manifest["files"]["model.onnx"]["sha256"]) == 64
    assert "torch" in manifest["tools"] and "compressor" in manifest["tools"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="boom"), BundleWriter(out) as b:
        assert b.path is not None
        (b.path / "model.onnx").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_overwrite_and_survives_a_failed_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as b:
        b.manifest["name"] = "first"
    with pytest.raises(CompressorError, match="already exists; pass --overwrite"):
        with BundleWriter(out):
            pass
    with pytest.raises(RuntimeError), BundleWriter(out, overwrite=True) as b:
        raise RuntimeError("crash mid-compile")
    assert read_manifest(out)["name"] == "first"  # the old bundle is untouched
    with BundleWriter(out, overwrite=True) as b:
        b.manifest["name"] = "second"
    assert read_manifest(out)["name"] == "second"


def test_corruption_is_detected(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as b:
        assert b.path is not None
        (b.path / "model.onnx").write_bytes(b"good")
        b.add_artifacts({"onnx": "model.onnx"})
    (out / "model.onnx").write_bytes(b"evil")
    with pytest.raises(CompressorError, match="does not match its sha256"):
        verify_bundle(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CompressorError, match="manifest is not valid JSON"):
        read_manifest(out)
    with pytest.raises(CompressorError, match="not a bundle"):
        read_manifest(tmp_path)


def test_missing_artifact_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match="was not written"), BundleWriter(tmp_path / "b") as b:
        b.add_artifacts({"onnx": "model.onnx"})
    assert not (tmp_path / "b").exists()


def test_side_by_side_timing_rotates_and_counts() -> None:
    from compressor.bench import latency_stats, time_side_by_side

    calls: list[str] = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_side_by_side(runs, warmup=1, repeats=5, block=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5}
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:8] == ["a", "a", "a", "b", "b", "b"]  # blocks of 3, the first untimed
    stats = latency_stats([0.010, 0.020, 0.030], batch=4)
    assert stats["median_ms"] == 20.0 and stats["throughput_per_s"] == 200.0
