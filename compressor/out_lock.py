"""The lock beside ``--out``: of two compiles to one bundle, the second stops at once.

``.NAME.compressor-lock`` next to ``--out`` holds an exclusive ``flock`` for the whole compile
and the owner's pid (named in the refusal). It is unlinked while still held, so whoever opens
it next checks that it locked the file still at that path and retries on a fresh one if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path

from compressor.errors import CompressorError


class OutLock:
    """An exclusive ``flock`` on ``.NAME.compressor-lock`` beside ``out``, holding our pid."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}.compressor-lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise CompressorError(
                    f"--out {self.out}: another compile ({who}) is writing this bundle now; "
                    "wait for it to finish or choose another --out"
                ) from None
            # Its last holder may have unlinked the file between our open and flock: retry.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            content = os.pread(fd, 64, 0).decode(errors="replace").strip()
            if content and not re.fullmatch(r"\d+", content):
                os.close(fd)
                raise CompressorError(f"{self.path} exists and is not compressor's lock file; move it away")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still held: whoever opens it next retries on a fresh file
        os.close(self._fd)
        self._fd = None
