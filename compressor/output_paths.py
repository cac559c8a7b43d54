"""Where a compile writes and what it may remove: the user's files are never deleted.

Besides the bundle itself, a compile writes three things, each marked with its owner so
that a later compile can tell what a dead (killed) compile left from what a live one holds:

* ``.NAME.partial-PID-XXXX/`` next to ``--out``: the bundle being written, with an owner
  marker (pid, process start time, host, ``--out``) inside until the final rename;
* ``.NAME.compressor-lock`` next to ``--out`` (``compressor.out_lock``): an ``flock`` held for the whole compile
  (the file holds the owner's pid), so that of two compiles to one ``--out`` the second
  stops at once and names the first;
* ``compressor-work-PID-XXXX/`` in the temp dir: the passes' scratch space (marker inside).

The final rename never replaces anything: ``renameat2(RENAME_NOREPLACE)`` where the kernel
has it, else ``mkdir`` of the destination (atomic, fails if anything is there) and a
``rename`` onto that empty folder of our own (which fails if anything was put into it).
``--overwrite`` replaces only a bundle: a folder whose ``manifest.json`` compressor wrote and
which holds nothing that manifest does not list; never the filesystem root, the home or
current directory (or a folder containing them), the model's source, the work dir, a file,
a symlink or any other folder. Removing an old bundle unlinks only the files it lists.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError

log = logging.getLogger(__name__)

OWNER_MARKER = ".compressor-owner.json"
WORK_PREFIX = "compressor-work-"
# What compressor.bundle writes beside the files its manifest lists.
BUNDLE_OWN_FILES = ("manifest.json", "manifest.sig")

Report = Callable[[str], None]


@dataclass(frozen=True)
class Protected:
    """A path ``--overwrite`` must never replace: ``label`` names it in the refusal."""

    label: str
    path: Path
    inside_too: bool = False  # also refuse a destination inside it (the model's source)


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# ---------------------------------------------------------------------------- owners


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a later process
    return True


def write_owner_marker(folder: Path, out: Path | None = None) -> None:
    record = {
        "pid": os.getpid(),
        "start": _proc_start(os.getpid()),
        "host": socket.gethostname(),
        "out": None if out is None else str(out),
    }
    (folder / OWNER_MARKER).write_text(json.dumps(record), encoding="utf-8")


def read_owner_marker(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / OWNER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _dead_owner(folder: Path, out: Path | None = None) -> int | None:
    """The pid of the dead compile that marked ``folder`` as its own, else None (live, foreign,
    another host's or another destination's: left alone)."""
    record = read_owner_marker(folder)
    if record is None or record.get("host") != socket.gethostname():
        return None
    if out is not None and record.get("out") != str(out):
        return None
    pid = int(record["pid"])
    return None if _alive(pid, record.get("start")) else pid


# ---------------------------------------------------------------------------- checks


def _check_below_folders(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder (not a file, not a broken link)."""
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise CompressorError(
                    f"{what} {path}: {parent} is a file, not a folder; choose a path below a folder"
                )
            return


def check_work_dir(work_dir: Path, out: Path) -> None:
    """``--work-dir``: a folder (or a path one can be made at), not the bundle nor inside it."""
    work = Path(os.path.abspath(work_dir))
    _check_below_folders(work, "--work-dir")
    if os.path.lexists(work) and not work.is_dir():
        raise CompressorError(
            f"--work-dir {work} is a file, not a folder; choose a folder for the scratch files"
        )
    if _within(_real(work), _real(os.path.abspath(out))):
        raise CompressorError(
            f"--work-dir {work} is --out {out} or inside it: the bundle replaces --out at the end; "
            "choose a work dir outside it"
        )


def check_destination(out: Path, overwrite: bool, protect: Sequence[Protected] = ()) -> None:
    """Refuse, in one line, an ``--out`` this compile must not write (or replace)."""
    out = Path(os.path.abspath(out))
    _check_below_folders(out, "--out")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise CompressorError(
            f"{out} already exists; pass --overwrite (it replaces only a compressor bundle) or choose another --out"
        )
    check_replaceable(out, protect)


def check_replaceable(out: Path, protect: Sequence[Protected] = ()) -> list[Path]:
    """What ``--overwrite`` would remove at ``out``: raises unless it is a bundle and nothing else."""
    out = Path(os.path.abspath(out))
    rule = "--overwrite replaces only a bundle compressor wrote"
    if os.path.islink(out):
        raise CompressorError(
            f"--out {out} is a symlink; {rule}: remove the link yourself or choose another --out"
        )
    if not out.is_dir():
        raise CompressorError(f"--out {out} is a file, not a bundle; {rule}: choose another --out")
    real = _real(out)
    named = [Protected("the filesystem root", Path(real.anchor))]
    with contextlib.suppress(RuntimeError, KeyError):
        named.append(Protected("your home directory", Path.home()))
    named.append(Protected("the current directory", Path.cwd()))
    for p in [*named, *protect]:
        where = _real(p.path)
        if real == where:
            raise CompressorError(f"--out {out} is {p.label}; {rule}: choose another --out")
        if _within(where, real):
            raise CompressorError(f"--out {out} contains {p.label} ({where}); {rule}: choose another --out")
        if p.inside_too and _within(real, where):
            raise CompressorError(f"--out {out} is inside {p.label} ({where}); choose an --out outside it")
    return bundle_entries(out)


def bundle_entries(folder: Path) -> list[Path]:
    """Every file and link in ``folder``, which must be a bundle holding only what it lists."""
    not_ours = f"{folder} is not a bundle compressor wrote"
    advice = "--overwrite replaces only a bundle: remove it yourself or choose another --out"
    try:
        manifest = json.loads((folder / BUNDLE_OWN_FILES[0]).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressorError(f"{not_ours} (no {BUNDLE_OWN_FILES[0]}); {advice}") from None
    except (OSError, ValueError) as e:
        raise CompressorError(f"{not_ours} ({BUNDLE_OWN_FILES[0]} unreadable: {e}); {advice}") from None
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("format_version"), int)
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("artifacts"), dict)
    ):
        raise CompressorError(
            f"{not_ours} ({BUNDLE_OWN_FILES[0]} lacks format_version/files/artifacts); {advice}"
        )
    listed = set(manifest["files"]) | set(BUNDLE_OWN_FILES)
    entries: list[Path] = []
    unlisted: list[Path] = []

    def fail(e: OSError) -> None:
        raise e

    try:
        for root, dirs, files in os.walk(folder, onerror=fail):
            for name in [*dirs, *files]:
                p = Path(root) / name
                if name in dirs and not p.is_symlink():
                    continue  # a real folder: removed only once empty
                (entries if p.relative_to(folder).as_posix() in listed else unlisted).append(p)
    except OSError as e:
        raise CompressorError(f"{folder}: cannot list every file in it ({e}); {advice}") from None
    if unlisted:
        names = ", ".join(p.relative_to(folder).as_posix() for p in sorted(unlisted)[:3])
        more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        raise CompressorError(
            f"{folder} holds {names}{more}, which its manifest does not list (not written by compressor); "
            "--overwrite would delete it: move it out of the bundle first"
        )
    return entries


# ---------------------------------------------------------------------------- renames


@functools.cache
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename the folder ``src`` to ``dst`` unless something is at ``dst`` (then False, both kept).

    ``os.rename`` alone silently replaces an empty folder (and ``os.replace`` more)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # No renameat2 (old kernel or libc, or a filesystem without it): claim the name with
    # mkdir, then rename onto that empty folder of ours; it fails if anyone filled it meanwhile.
    try:
        os.mkdir(dst)
    except FileExistsError:
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False  # what was put into our placeholder is someone else's: keep it
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise
    return True


def remove_bundle(folder: Path, entries: Sequence[Path], report: Report | None = None) -> None:
    """Unlink ``entries`` (from ``bundle_entries``) and then the folders they leave empty."""
    for p in entries:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(Path(root) / d)
    try:
        os.rmdir(folder)
    except OSError:
        (report or log.warning)(f"{folder}: left in place, it holds files the old bundle did not list")


# ---------------------------------------------------------------------------- leftovers


def remove_dead_leftovers(out: Path, report: Report) -> None:
    """Beside ``out`` (under its lock): remove the partial bundles of dead compiles to ``out``,
    and put back an old bundle a dead ``--overwrite`` had moved aside (or remove it if the new
    one got into place)."""
    partial, aside = f".{out.name}.partial-", f".{out.name}.old-"
    for p in sorted(out.parent.iterdir()):
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(partial):
            pid = _dead_owner(p, out)
            if pid is not None:
                shutil.rmtree(p, ignore_errors=True)
                report(f"removed {p}: the partial bundle of a compile (pid {pid}) that was killed")
        elif p.name.startswith(aside):
            pid_text = p.name[len(aside) :].split("-", 1)[0]
            if not pid_text.isdigit() or _alive(int(pid_text)):
                continue
            if not os.path.lexists(out) and rename_noreplace(p, out):
                report(
                    f"restored {out}: a killed --overwrite compile (pid {pid_text}) had moved it to {p.name}"
                )
                continue
            try:
                entries = bundle_entries(p)
            except CompressorError as e:
                report(f"left {p} (the old bundle a killed compile moved aside) in place: {e}")
                continue
            remove_bundle(p, entries, report)
            report(f"removed {p}: the old bundle a killed --overwrite compile (pid {pid_text}) replaced")


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, outermost first."""
    made = [p for p in [path, *path.parents] if not os.path.lexists(p)][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(made: Sequence[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            p.rmdir()  # only while empty


@contextlib.contextmanager
def temp_work_dir(report: Report) -> Iterator[Path]:
    """A marked scratch dir in the temp dir, removed afterwards; first removes the ones dead
    compiles left there (ours only: our uid, our host, a dead owner)."""
    tmp = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for p in sorted(tmp.glob(f"{WORK_PREFIX}*")):
            st = p.lstat()
            if p.is_symlink() or not p.is_dir() or st.st_uid != os.getuid():
                continue
            pid = _dead_owner(p)
            if pid is not None:
                shutil.rmtree(p, ignore_errors=True)
                report(f"removed {p}: the work dir of a compile (pid {pid}) that was killed")
    path = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    try:
        write_owner_marker(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def kept_work_dir(path: Path) -> Iterator[Path]:
    """The user's ``--work-dir``: created and kept, unless a failed compile left it empty."""
    try:
        made = make_dirs(path)
    except OSError as e:
        raise CompressorError(f"--work-dir {path}: cannot create it ({e}); choose another folder") from None
    try:
        yield path
    except BaseException:
        remove_empty(made)
        raise
