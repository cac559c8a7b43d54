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
