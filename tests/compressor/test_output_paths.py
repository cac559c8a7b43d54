"""`--out`, `--overwrite` and `--work-dir`: the user's files are never deleted.

Every refusal here happens before the model loads (``plan`` is replaced by a function that
fails the test), is one line, exits 2 and writes nothing. Folders that must be protected by
name (the current directory, home, the model, the work dir) are made to look like bundles,
so that only the named rule can refuse them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from compressor.app.bench_outputs import check_bench_outputs
from compressor.app.cli import main
from compressor.output_paths import OWNER_MARKER, WORK_PREFIX, rename_noreplace


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, a folder's or link's None."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(folder.rglob("*"))
    }


def _bundle_like(folder: Path, files: dict[str, bytes]) -> None:
    """``folder`` holding ``files`` and a manifest (as compressor writes) that lists them all."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    listed = {rel: {"sha256": "0" * 64, "bytes": len(d)} for rel, d in files.items()}
    manifest = {"format_version": 1, "artifacts": {}, "files": listed}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _recipe(tmp_path: Path, model: Path | str, steps: int = 1) -> Path:
    recipe = {
        "name": "tiny",
        "target": "cpu",
        "model": {"source": str(model)},
        "data": {
            "calibration_samples": 8,
            "train_samples": 8,
            "eval_samples": 8,
            "max_length": 16,
            "batch_size": 8,
        },
        "passes": [{"pass": "distill", "steps": steps, "lr": 1e-5, "warmup_steps": 0}],
        "exports": [{"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [8]}],
        "evaluation": {"run_bench": False},
    }
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "bert"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    return folder


@pytest.fixture()
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr("compressor.app.compile.plan", fail)


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], *expect: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for text in expect:
        assert text in err, err
    return err


def _compile_args(tmp_path: Path, model: Path, *rest: str) -> list[str]:
    return ["compile", "--recipe", str(_recipe(tmp_path, model)), "--no-bench", *rest]


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("how", [".", "absolute", "..", "parent"])
def test_overwrite_refuses_the_current_directory_and_its_parents(
    how: str, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cwd = tmp_path / "project" / "here"
    _bundle_like(cwd, {"notes.txt": b"my notes", "src/main.py": b"print(1)"})
    monkeypatch.chdir(cwd)
    out = {".": ".", "absolute": str(cwd), "..": "..", "parent": str(cwd.parent)}[how]
    args = _compile_args(tmp_path, model, "--out", out, "--overwrite")
    before = _snapshot(tmp_path)
    what = "is the current directory" if how in (".", "absolute") else "contains the current directory"
    _refused(capsys, args, what)
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("no_model_load")
def test_overwrite_refuses_the_model_its_parent_and_a_folder_inside_it(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _bundle_like(model, {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"w" * 64})
    _bundle_like(model / "old-bundle", {"model.onnx": b"onnx"})
    args = _compile_args(tmp_path, model)
    before = _snapshot(tmp_path)
    _refused(capsys, [*args, "--out", str(model), "--overwrite"], "is the model's source folder")
    _refused(capsys, [*args, "--out", str(model.parent), "--overwrite"], "contains the model's source folder")
    _refused(
        capsys, [*args, "--out", str(model / "old-bundle"), "--overwrite"], "is inside the model's source"
    )
    _refused(capsys, [*args, "--out", str(model), "--model", str(model), "--overwrite"], "model's source")
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("no_model_load")
def test_overwrite_refuses_home_and_the_filesystem_root(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home" / "me"
    _bundle_like(home, {".bashrc": b"export X=1"})
    monkeypatch.setenv("HOME", str(home))
    args = _compile_args(tmp_path, model)
    before = _snapshot(tmp_path)
    _refused(capsys, [*args, "--out", str(home), "--overwrite"], "is your home directory")
    _refused(capsys, [*args, "--out", str(home.parent), "--overwrite"], "contains your home directory")
    _refused(capsys, [*args, "--out", "/", "--overwrite"], "is the filesystem root")
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("kind", ["user folder", "file", "symlink", "foreign manifest", "empty folder"])
def test_overwrite_replaces_nothing_but_a_bundle(
    kind: str, tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    if kind == "user folder":
        (out / "photos").mkdir(parents=True)
        (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8jpeg")
    elif kind == "file":
        out.write_bytes(b"my thesis")
    elif kind == "symlink":
        (tmp_path / "real").mkdir()
        _bundle_like(tmp_path / "real", {"model.onnx": b"x"})
        out.symlink_to(tmp_path / "real")
    elif kind == "foreign manifest":
        out.mkdir()
        (out / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    else:
        out.mkdir()
    args = [*_compile_args(tmp_path, model), "--out", str(out), "--overwrite"]
    before = _snapshot(tmp_path)
    expect = {"file": "is a file, not a bundle", "symlink": "is a symlink"}.get(
        kind, "not a bundle compressor wrote"
    )
    _refused(capsys, args, expect)
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("no_model_load")
def test_overwrite_refuses_a_bundle_the_user_put_a_file_into(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compressor.bundle import BundleWriter

    out = tmp_path / "bundle"
    with BundleWriter(out) as b:
        assert b.path is not None
        (b.path / "model.onnx").write_bytes(b"onnx")
    (out / "notes.txt").write_text("results of my run")
    (out / "more").mkdir()
    (out / "more" / "plot.png").write_bytes(b"png")
    before = _snapshot(out)
    args = [*_compile_args(tmp_path, model), "--out", str(out), "--overwrite"]
    _refused(capsys, args, "holds more/plot.png, notes.txt", "does not list", "move it out")
    assert _snapshot(out) == before


@pytest.mark.usefixtures("no_model_load")
def test_bad_out_and_work_dir_paths_are_one_line_and_write_nothing(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _compile_args(tmp_path, model)
    (tmp_path / "somefile").write_text("data")
    before = _snapshot(tmp_path)
    below = "somefile is a file, not a folder"
    _refused(capsys, [*args, "--out", str(tmp_path / "somefile" / "bundle")], below)
    _refused(capsys, [*args, "--out", str(tmp_path / "somefile" / "a" / "b"), "--overwrite"], below)
    out = str(tmp_path / "out")
    _refused(
        capsys, [*args, "--out", out, "--work-dir", str(tmp_path / "somefile")], "is a file, not a folder"
    )
    _refused(capsys, [*args, "--out", out, "--work-dir", str(tmp_path / "somefile" / "w")], below)
    _refused(capsys, [*args, "--out", out, "--work-dir", out], "or inside it")
    _refused(capsys, [*args, "--out", out, "--work-dir", f"{out}/scratch"], "or inside it")
    _refused(capsys, [*args, "--out", str(tmp_path), "--work-dir", str(tmp_path / "w")], "or inside it")
    assert _snapshot(tmp_path) == before


@pytest.mark.usefixtures("no_model_load")
def test_overwrite_refuses_the_work_dir_even_when_it_looks_like_a_bundle(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    _bundle_like(work, {"distill-abc.pt": b"checkpoint"})
    args = [*_compile_args(tmp_path, model), "--out", str(work), "--work-dir", str(work), "--overwrite"]
    before = _snapshot(tmp_path)
    _refused(capsys, args, "--work-dir")
    assert _snapshot(tmp_path) == before


def test_a_refused_recipe_leaves_no_folder_it_made(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The output checks run first, so the parents of --out and a new --work-dir exist while the
    model loads; a compile that fails leaves none of them behind."""
    args = _compile_args(tmp_path, tiny_bert_dir)
    recipe = yaml.safe_load(Path(args[2]).read_text())
    recipe["passes"] = [{"pass": "quantize", "targets": ["decoder.*"]}]  # matches nothing: a plan error
    Path(args[2]).write_text(yaml.safe_dump(recipe))
    before = _snapshot(tmp_path)
    out, work = tmp_path / "a" / "b" / "bundle", tmp_path / "w" / "x"
    assert main([*args, "--out", str(out), "--work-dir", str(work)]) == 2
    assert _snapshot(tmp_path) == before


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _mark(folder: Path, pid: int, out: Path | None = None) -> None:
    import socket

    folder.mkdir(parents=True)
    (folder / "half.bin").write_bytes(b"half")
    record = {
        "pid": pid,
        "start": None,
        "host": socket.gethostname(),
        "out": None if out is None else str(out),
    }
    (folder / OWNER_MARKER).write_text(json.dumps(record))


def test_a_dead_compiles_temp_work_dir_is_removed_and_a_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compressor.app.compile import work_dir_for

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, live, unmarked = (tmp_path / f"{WORK_PREFIX}{n}" for n in ("1-dead", "2-live", "3-unmarked"))
    _mark(dead, _dead_pid())
    _mark(live, os.getpid())
    unmarked.mkdir()
    (unmarked / "x").write_text("not ours to judge")
    notes: list[str] = []
    with work_dir_for(None, notes.append) as work:
        assert work.is_dir() and json.loads((work / OWNER_MARKER).read_text())["pid"] == os.getpid()
        assert not dead.exists() and live.is_dir() and (unmarked / "x").is_file()
    assert not work.exists()
    assert len(notes) == 1 and str(dead) in notes[0] and "killed" in notes[0]


def test_renameat2_and_its_fallback_never_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr("compressor.output_paths._renameat2", lambda: None)
        src, dst = tmp_path / f"src{fallback}", tmp_path / f"dst{fallback}"
        src.mkdir()
        dst.mkdir()  # empty: os.rename would silently replace it
        assert not rename_noreplace(src, dst) and src.is_dir() and dst.is_dir()
        dst.rmdir()
        assert rename_noreplace(src, dst) and dst.is_dir() and not src.exists()


def test_sigterm_in_main_cleans_up_like_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import compressor.app.cli

    def killed(args: Any) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    def unhandled(signum: int, frame: Any) -> None:
        raise AssertionError("main() installed no SIGTERM handler")

    monkeypatch.setattr(compressor.app.cli, "cmd_targets", killed)
    before = signal.signal(signal.SIGTERM, unhandled)  # (without it, the test run itself would die)
    assert main(["targets"]) == 143
    assert capsys.readouterr().err == "terminated: no bundle was written\n"
    assert signal.getsignal(signal.SIGTERM) is unhandled  # main() put the caller's handler back
    signal.signal(signal.SIGTERM, before)


def _start_compile(tmp_path: Path, model: Path, out: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """A compile in a subprocess (its temp dir ``tmp_path/tmp``), once its (long) pass is running."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "HF_HUB_OFFLINE": "1"}
    recipe = _recipe(tmp_path, model, steps=200_000)
    cmd = [sys.executable, "-m", "compressor.app.cli", "compile", "--recipe", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 240
    while not any("pass 1/1" in line for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.2)
    time.sleep(1.0)
    return proc, lines


@pytest.mark.slow
def test_sigterm_during_a_compile_leaves_nothing(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundles" / "b"
    proc, lines = _start_compile(tmp_path, tiny_bert_dir, out)
    assert any(p.name.startswith(".b.partial-") for p in out.parent.iterdir())
    assert any(p.name.startswith(WORK_PREFIX) for p in (tmp_path / "tmp").iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    time.sleep(0.2)
    assert "terminated: no bundle was written" in "".join(lines)
    assert not out.parent.exists()  # the partial, the lock and the folder the compile made for them
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_the_next_compile_removes_what_a_killed_one_left(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundles" / "b"
    proc, _ = _start_compile(tmp_path, tiny_bert_dir, out)
    proc.kill()
    proc.wait(timeout=60)
    partials = [p for p in out.parent.iterdir() if p.name.startswith(".b.partial-")]
    works = list((tmp_path / "tmp").iterdir())
    assert len(partials) == 1 and len(works) == 1 and (partials[0] / OWNER_MARKER).is_file()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert main(_compile_args(tmp_path, tiny_bert_dir, "--out", str(out))) == 0
    err = capsys.readouterr().err
    assert f"removed {partials[0]}" in err and f"removed {works[0]}" in err and f"pid {proc.pid}" in err
    assert [p.name for p in out.parent.iterdir()] == ["b"] and list((tmp_path / "tmp").iterdir()) == []
    assert (out / "model.onnx").is_file()


def test_bench_replaces_only_its_own_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench --out` / `--json` never overwrite a user's files; the refusal comes before any
    timing (the bundle here does not even exist: the output check runs first)."""
    user = tmp_path / "notes"
    user.mkdir()
    (user / "report.html").write_text("my report")
    (user / "bench.json").write_text('{"mine": true}')
    mine = tmp_path / "results.json"
    mine.write_text("[1, 2, 3]")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["--out", str(user)], "did not write"),
        (["--out", str(a_file)], "is not a folder"),
        (["--out", str(a_file / "sub")], "is a file"),
        (["--out", str(tmp_path / "new"), "--json", str(mine)], "not a compressor bench result"),
    ]
    for extra, why in cases:
        assert main(["bench", str(tmp_path / "no-bundle"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and why in err, err
    assert (user / "report.html").read_text() == "my report" and mine.read_text() == "[1, 2, 3]"
    assert a_file.read_text() == "x" and not (tmp_path / "new").exists()
    # a folder an earlier bench wrote is replaced; so is an earlier --json result
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("bench.md", "report.html"):
        (ours / name).write_text("old")
    (ours / "bench.json").write_text('{"device": "cpu", "engines": {}, "latency": []}')
    check_bench_outputs(ours, ours / "bench.json")
    check_bench_outputs(tmp_path / "brand-new", None)
