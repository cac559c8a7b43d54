"""compressor.out_lock: of two compiles to one ``--out``, the second is refused at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from compressor.errors import CompressorError
from compressor.out_lock import OutLock


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "bundle"


@pytest.fixture
def held(out: Path) -> Iterator[OutLock]:
    lock = OutLock(out)
    lock.acquire()
    yield lock
    lock.release()


def test_the_lock_file_sits_beside_out_and_holds_our_pid(out: Path, held: OutLock) -> None:
    assert held.path == out.parent / ".bundle.compressor-lock"
    assert held.path.read_text() == f"{os.getpid()}\n"
    assert not out.exists()  # the lock never creates --out itself


def test_a_second_holder_is_refused_naming_the_first(out: Path, held: OutLock) -> None:
    with pytest.raises(CompressorError) as e:
        OutLock(out).acquire()  # its own open file description: flock conflicts within one process too
    assert str(e.value) == (
        f"--out {out}: another compile (pid {os.getpid()}) is writing this bundle now; "
        "wait for it to finish or choose another --out"
    )
    assert held.path.read_text() == f"{os.getpid()}\n"  # the refused one wrote nothing


def test_release_unlinks_the_file_and_a_next_compile_gets_the_lock(out: Path) -> None:
    first = OutLock(out)
    first.acquire()
    first.release()
    assert not first.path.exists()
    second = OutLock(out)
    second.acquire()
    assert second.path.read_text() == f"{os.getpid()}\n"
    second.release()
    second.release()  # twice is harmless
    OutLock(out).release()  # and so is never acquiring


def test_a_stale_lock_file_is_taken_over(out: Path) -> None:
    stale = out.parent / ".bundle.compressor-lock"
    stale.write_text("99999999\n")  # a dead compile's pid, no flock held
    lock = OutLock(out)
    lock.acquire()
    assert stale.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_foreign_file_at_the_lock_path_is_not_touched(out: Path) -> None:
    foreign = out.parent / ".bundle.compressor-lock"
    foreign.write_text("my notes\n")
    with pytest.raises(CompressorError) as e:
        OutLock(out).acquire()
    assert str(e.value) == f"{foreign} exists and is not compressor's lock file; move it away"
    assert foreign.read_text() == "my notes\n"


def test_a_holder_that_is_not_a_pid_is_another_process(out: Path) -> None:
    import fcntl

    path = out.parent / ".bundle.compressor-lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, but empty
        with pytest.raises(CompressorError, match=r"another compile \(another process\) is writing"):
            OutLock(out).acquire()
    finally:
        os.close(fd)


def test_a_symlink_at_the_lock_path_is_not_followed(out: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    (out.parent / ".bundle.compressor-lock").symlink_to(target)
    with pytest.raises(OSError):  # O_NOFOLLOW; BundleWriter turns it into a CompressorError
        OutLock(out).acquire()
    assert target.read_text() == "keep\n"
