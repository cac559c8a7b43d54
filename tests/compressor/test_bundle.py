from __future__ import annotations

import os
from pathlib import Path

import pytest

from compressor.bundle import BundleWriter, verify_bundle
from compressor.errors import CompressorError
from compressor.manifest import read_manifest


def test_bundle_is_written_whole(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as b:
        assert b.path is not None and not out.exists()  # nothing visible while writing
        (b.path / "model.onnx").write_bytes(b"\x00onnx")
        b.add_artifacts({"onnx": "model.onnx"})
        b.manifest.name = "x"
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
        b.manifest.name = "first"
    with pytest.raises(CompressorError, match="already exists; pass --overwrite"):
        with BundleWriter(out):
            pass
    with pytest.raises(RuntimeError), BundleWriter(out, overwrite=True) as b:
        raise RuntimeError("crash mid-compile")
    assert read_manifest(out)["name"] == "first"  # the old bundle is untouched
    with BundleWriter(out, overwrite=True) as b:
        b.manifest.name = "second"
    assert read_manifest(out)["name"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no old copy, lock or partial left


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
    from compressor.app.timing import latency_stats, time_side_by_side

    calls: list[str] = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_side_by_side(runs, warmup=1, repeats=5, block=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5}
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:8] == ["a", "a", "a", "b", "b", "b"]  # blocks of 3, the first untimed
    stats = latency_stats([0.010, 0.020, 0.030], batch=4)
    assert stats["median_ms"] == 20.0 and stats["throughput_per_s"] == 200.0


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "mkdir+rename"])
@pytest.mark.parametrize("appeared", ["folder", "empty folder", "file"])
def test_a_destination_that_appears_meanwhile_is_kept(
    appeared: str, fallback: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fallback:
        monkeypatch.setattr("compressor.output_paths._renameat2", lambda: None)
    out = tmp_path / "b"
    with pytest.raises(CompressorError, match="appeared while this compile ran and was kept") as e:
        with BundleWriter(out) as b:
            assert b.path is not None
            (b.path / "model.onnx").write_bytes(b"new")
            if appeared == "file":
                out.write_bytes(b"someone's file")
            else:
                out.mkdir()  # e.g. another tool, or the user, wrote here while we compiled
                if appeared == "folder":
                    (out / "theirs.txt").write_bytes(b"theirs")
    if appeared == "file":
        assert out.read_bytes() == b"someone's file"
    else:
        assert [p.name for p in out.iterdir()] == ([] if appeared == "empty folder" else ["theirs.txt"])
    new = tmp_path / f"b.new-{os.getpid()}"
    assert str(new) in str(e.value)  # the finished bundle is kept under a name the error gives
    assert verify_bundle(new)["files"]["model.onnx"]["bytes"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", new.name])


def test_two_writers_to_one_out_the_second_is_refused_naming_the_first(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as first:
        first.manifest.name = "first"
        for overwrite in (False, True):
            with pytest.raises(CompressorError, match=f"another compile \\(pid {os.getpid()}\\) is writing"):
                with BundleWriter(out, overwrite=overwrite):
                    raise AssertionError("the second writer must not start")
    assert read_manifest(out)["name"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no lock file, no partial left


def test_overwrite_refuses_at_the_end_a_bundle_the_user_wrote_into_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as b:
        b.manifest.name = "first"
    with pytest.raises(CompressorError, match="holds notes.txt, which its manifest does not list") as e:
        with BundleWriter(out, overwrite=True) as b:
            b.manifest.name = "second"
            (out / "notes.txt").write_text("written during the compile")
    assert (
        read_manifest(out)["name"] == "first"
        and (out / "notes.txt").read_text() == "written during the compile"
    )
    assert f"b.new-{os.getpid()}" in str(e.value)
    assert read_manifest(tmp_path / f"b.new-{os.getpid()}")["name"] == "second"


def test_what_a_dead_compile_left_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    import json
    import socket

    from compressor.output_paths import OWNER_MARKER

    out = tmp_path / "b"

    def partial(name: str, pid: int) -> Path:
        p = tmp_path / name
        p.mkdir()
        (p / "model.onnx").write_bytes(b"half")
        marker = {"pid": pid, "start": None, "host": socket.gethostname(), "out": str(out)}
        (p / OWNER_MARKER).write_text(json.dumps(marker))
        return p

    dead_pid = _dead_pid()
    dead = partial(f".b.partial-{dead_pid}-x", dead_pid)
    live = partial(f".b.partial-{os.getpid()}-y", os.getpid())
    unmarked = tmp_path / ".b.partial-z"
    unmarked.mkdir()
    (unmarked / "mine.txt").write_text("no marker: not known to be ours")
    notes: list[str] = []
    with BundleWriter(out, report=notes.append) as b:
        b.manifest.name = "new"
    assert not dead.exists() and live.is_dir() and (unmarked / "mine.txt").is_file()
    assert notes == [f"removed {dead}: the partial bundle of a compile (pid {dead_pid}) that was killed"]


def test_an_old_bundle_a_dead_overwrite_moved_aside_is_put_back(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with BundleWriter(out) as b:
        b.manifest.name = "first"
    aside = tmp_path / f".b.old-{_dead_pid()}-abc"
    out.rename(aside)  # killed between moving the old bundle aside and renaming the new one in
    notes: list[str] = []
    with pytest.raises(CompressorError, match="already exists"), BundleWriter(out, report=notes.append):
        pass
    assert read_manifest(out)["name"] == "first" and not aside.exists()
    assert len(notes) == 1 and notes[0].startswith(f"restored {out}")
