"""compressor.manifest: the typed top level of ``manifest.json`` and reading it back safely."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from compressor import __version__
from compressor.errors import CompressorError
from compressor.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_MAX_BYTES,
    Manifest,
    parse_manifest,
    read_manifest,
    read_manifest_bytes,
    sha256_file,
    tool_versions,
)


def test_an_empty_manifest_writes_only_the_required_keys() -> None:
    assert Manifest().to_dict() == {"format_version": FORMAT_VERSION, "artifacts": {}, "files": {}}
    assert FORMAT_VERSION == 1


def test_keys_are_written_in_compile_order_none_left_out_extra_last() -> None:
    m = Manifest(
        tools={"python": "3"},
        name="n",
        passes=[{"pass": "quantize"}],
        benchmark_skipped="no GPU",
        files={"model.onnx": {"sha256": "ab", "bytes": 2}},
        artifacts={"onnx": "model.onnx"},
        recipe=None,
        extra={"future_key": 1},
    )
    data = m.to_dict()
    assert list(data) == [
        "format_version",
        "artifacts",
        "files",
        "name",
        "passes",
        "benchmark_skipped",
        "tools",
        "future_key",
    ]
    assert json.loads(m.to_json()) == data
    assert m.to_json().startswith('{\n  "format_version": 1,\n  "artifacts": {\n    "onnx": "model.onnx"')


def test_from_dict_round_trips_and_keeps_unknown_keys() -> None:
    raw = {
        "format_version": 1,
        "artifacts": {"onnx": "model.onnx"},
        "files": {},
        "name": "tiny",
        "target": {"name": "cpu"},
        "verification": {"onnx": {"ok": True}},
        "created_utc": "2025-01-01T00:00:00Z",
        "newer": {"a": 1},
    }
    m = Manifest.from_dict(raw)
    assert m.name == "tiny" and m.target == {"name": "cpu"} and m.extra == {"newer": {"a": 1}}
    assert m.recipe is None and m.passes is None
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)
    assert Manifest.from_dict(json.loads(m.to_json())) == m


def test_from_dict_fills_missing_required_keys_with_defaults() -> None:
    m = Manifest.from_dict({"name": "x"})
    assert (m.format_version, m.artifacts, m.files) == (1, {}, {})


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20) + b"tail"  # past one 1 MiB read
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert (
        sha256_file(tmp_path / "empty") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_tool_versions_names_python_compressor_and_torch() -> None:
    import torch

    versions = tool_versions()
    assert versions["compressor"] == __version__ and versions["torch"] == torch.__version__
    assert list(versions)[:2] == ["python", "compressor"]


def test_read_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"format_version": 1, "name": "é"}', encoding="utf-8")
    assert read_manifest(tmp_path) == {"format_version": 1, "name": "é"}
    assert read_manifest_bytes(tmp_path) == '{"format_version": 1, "name": "é"}'.encode()


def test_read_manifest_refuses_what_is_not_a_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(CompressorError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path}: not a bundle (no manifest.json)"
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(CompressorError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path}: not a bundle (manifest.json is not a regular file)"
    link = tmp_path / "linked"
    link.mkdir()
    (tmp_path / "real.json").write_text("{}", encoding="utf-8")
    (link / MANIFEST).symlink_to(tmp_path / "real.json")
    with pytest.raises(CompressorError) as e:
        read_manifest(link)
    assert str(e.value) == f"{link / MANIFEST}: is a symlink; a bundle's manifest is its own file"


def test_read_manifest_refuses_one_past_the_size_bound(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST
    with open(path, "wb") as f:
        f.truncate(MANIFEST_MAX_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(CompressorError) as e:
        read_manifest_bytes(tmp_path)
    assert (
        str(e.value)
        == f"{path}: {MANIFEST_MAX_BYTES + 1} bytes, past the {MANIFEST_MAX_BYTES} a manifest may have"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff{}", "b/manifest.json: manifest is not UTF-8 text"),
        (
            b"{",
            "b/manifest.json: manifest is not valid JSON: Expecting property name enclosed in double quotes",
        ),
        (b"[1]", "b/manifest.json: manifest is a JSON list, not an object"),
        (b'"x"', "b/manifest.json: manifest is a JSON str, not an object"),
        (
            b"[" * 100_000 + b"]" * 100_000,
            "b/manifest.json: manifest is nested too deeply to be one this tool wrote",
        ),
    ],
)
def test_parse_manifest_refusals(data: bytes, message: str) -> None:
    with pytest.raises(CompressorError) as e:
        parse_manifest(data, "b/manifest.json")
    assert str(e.value).startswith(message)
