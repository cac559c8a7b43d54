"""The bundle: the compiler's product, written atomically.

A bundle is a directory with ``manifest.json`` (``compressor.manifest``: recipe, target, tool
versions, pass history with metrics, artifacts with sha256) beside the artifacts and a report.
Everything is written into a hidden temporary directory next to the destination and
renamed into place only once complete, so an interrupted or failed compile leaves no
directory that looks like a bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, NoReturn

from compressor.errors import CompressorError
from compressor.manifest import (
    MANIFEST,
    Manifest,
    parse_manifest,
    read_manifest_bytes,
    sha256_file,
    tool_versions,
)
from compressor.out_lock import OutLock
from compressor.output_paths import (
    OWNER_MARKER,
    Protected,
    bundle_entries,
    check_destination,
    check_replaceable,
    make_dirs,
    read_owner_marker,
    remove_bundle,
    remove_dead_leftovers,
    remove_empty,
    rename_noreplace,
    write_owner_marker,
)
from compressor.trust import sign_bundle

log = logging.getLogger(__name__)


class BundleWriter:
    """Context manager: ``with BundleWriter(out) as b: ...`` writes ``out`` whole or not at all.

    On entry it checks ``out`` (``compressor.output_paths``), takes the lock beside it, removes
    what dead compiles to ``out`` left and makes the hidden partial folder. On a clean exit it
    writes the manifest and renames the partial into place without ever replacing what it did
    not check: a folder that appeared at ``out`` meanwhile is kept, and the new bundle is left
    beside it as ``NAME.new-PID`` (named in the error) so that the compile's work is not lost.
    With ``overwrite`` the old bundle is re-checked, moved aside, the new one renamed in, and
    only then are the old one's listed files removed (restored if the rename fails)."""

    def __init__(
        self,
        out_dir: Path,
        overwrite: bool = False,
        protect: Sequence[Protected] = (),
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.out_dir = Path(os.path.abspath(out_dir))
        self.overwrite = overwrite
        self.protect = tuple(protect)
        self.report: Callable[[str], None] = report or log.warning
        self.manifest = Manifest()
        self.written: dict[str, Any] | None = None  # the manifest as written, once the bundle is in place
        self.path: Path | None = None
        self._lock = OutLock(self.out_dir)
        self._made: list[Path] = []

    def __enter__(self) -> BundleWriter:
        check_destination(self.out_dir, self.overwrite, self.protect)  # before anything is written
        parent = self.out_dir.parent
        try:
            self._made = make_dirs(parent)
        except OSError as e:
            raise CompressorError(
                f"--out {self.out_dir}: cannot create {parent} ({e}); choose another --out"
            ) from None
        try:
            self._lock.acquire()
            remove_dead_leftovers(self.out_dir, self.report)
            check_destination(self.out_dir, self.overwrite, self.protect)  # again, under the lock
            prefix = f".{self.out_dir.name}.partial-{os.getpid()}-"
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            write_owner_marker(self.path, self.out_dir)
        except OSError as e:
            self._release(failed=True)
            raise CompressorError(
                f"--out {self.out_dir}: cannot write in {parent} ({e}); choose another --out"
            ) from None
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def add_artifacts(self, artifacts: dict[str, str]) -> None:
        assert self.path is not None
        for key, rel in artifacts.items():
            if not (self.path / rel).exists():
                raise CompressorError(f"exporter reported artifact {key}={rel}, but it was not written")
            self.manifest.artifacts[key] = rel

    def write_text(self, rel: str, text: str) -> None:
        assert self.path is not None
        (self.path / rel).write_text(text, encoding="utf-8")

    def _finalize(self) -> None:
        assert self.path is not None
        files = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and rel not in (MANIFEST, OWNER_MARKER):
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        self.manifest.files = files
        self.manifest.created_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest.tools = tool_versions()
        text = self.manifest.to_json()
        with open(self.path / MANIFEST, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        sign_bundle(self.path)  # over the manifest on disk, before the bundle is visible

        (self.path / OWNER_MARKER).unlink()
        self._install()
        self.written = json.loads(text)  # what a reader of the bundle gets, without reading it back

    def _install(self) -> None:
        """Rename the finished partial to ``out`` without replacing anything unchecked."""
        assert self.path is not None
        out = self.out_dir
        if not (self.overwrite and os.path.lexists(out)):
            if not rename_noreplace(self.path, out):
                self._keep_new(f"{out} appeared while this compile ran and was kept (not written by it)")
            return
        try:
            check_replaceable(out, self.protect)
        except CompressorError as e:
            self._keep_new(str(e))
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        aside.rmdir()  # a unique name: the old bundle is renamed to it
        if not rename_noreplace(out, aside):
            self._keep_new(f"could not move the old bundle {out} aside")
        try:
            entries = bundle_entries(aside)  # again: nothing can be added to it under its new name
        except CompressorError as e:
            self._restore(aside)
            self._keep_new(str(e).replace(str(aside), str(out)))
        try:
            placed = rename_noreplace(self.path, out)
        except BaseException:
            self._restore(aside)
            raise
        if not placed:
            self._keep_new(f"{out} appeared while the old bundle was moved aside (to {aside}); both kept")
        remove_bundle(aside, entries, self.report)

    def _restore(self, aside: Path) -> None:
        if not rename_noreplace(aside, self.out_dir):
            self.report(f"the old bundle {self.out_dir} is at {aside}: {self.out_dir} is taken")

    def _keep_new(self, why: str) -> NoReturn:
        """Leave the finished new bundle beside ``out`` under a reported name; raise ``why``."""
        assert self.path is not None
        new = self.out_dir.with_name(f"{self.out_dir.name}.new-{os.getpid()}")
        if rename_noreplace(self.path, new):
            self.path = new
        raise CompressorError(f"{why}; the new bundle was kept at {self.path}: move it where you want it")

    def _release(self, failed: bool) -> None:
        self._lock.release()
        if failed:
            remove_empty(self._made)  # the parents this writer made, if nothing else went there

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        failed = exc_type is not None
        try:
            if not failed:
                self._finalize()
        except BaseException:
            failed = True
            raise
        finally:
            if failed and self.path is not None and read_owner_marker(self.path) is not None:
                shutil.rmtree(self.path, ignore_errors=True)  # still our marked partial: not a bundle
            self._release(failed)


_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose paths and hashes were checked: the manifest and the bytes it was parsed
    from (what its signature is checked against)."""

    path: Path
    manifest: dict[str, Any]
    manifest_bytes: bytes


def relative_path(rel: object, where: str) -> str:
    """``rel`` as a normalised relative POSIX path that cannot leave the bundle, or an error."""
    if not isinstance(rel, str) or not rel:
        raise CompressorError(f"{where}: expected a path relative to the bundle, got {rel!r}")
    if "\x00" in rel or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise CompressorError(f"{where}: {rel!r} is not a plain relative path; a bundle names its own files")
    p = PurePosixPath(rel)
    if p.is_absolute():
        raise CompressorError(
            f"{where}: {rel!r} is an absolute path; a bundle names only files inside itself"
        )
    if ".." in p.parts:
        raise CompressorError(f"{where}: {rel!r} leads out of the bundle (..); refused")
    return p.as_posix()


def confined_path(root: Path, rel: str, where: str) -> tuple[Path, os.stat_result]:
    """``root/rel`` where no component is a symlink and the result stays in ``root``."""
    cur = root
    st: os.stat_result | None = None
    for part in PurePosixPath(rel).parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except OSError:
            raise CompressorError(f"{where}: {rel} is named in the manifest but missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise CompressorError(
                f"{where}: {rel} is or passes through a symlink; a bundle holds files, not links"
            )
    if st is None or not cur.resolve().is_relative_to(root):
        raise CompressorError(f"{where}: {rel!r} is not inside the bundle")
    return cur, st


def files_table(manifest: dict[str, Any], where: str) -> dict[str, tuple[str, int | None]]:
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise CompressorError(
            f"{where}: files: expected an object of path -> sha256, got {type(files).__name__}"
        )
    out: dict[str, tuple[str, int | None]] = {}
    for rel, info in files.items():
        key = relative_path(rel, f"{where}: files")
        sha = info.get("sha256") if isinstance(info, dict) else None
        size = info.get("bytes") if isinstance(info, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX64):
            raise CompressorError(f"{where}: files[{rel!r}]: no sha256 (64 lowercase hex digits)")
        if size is not None and (type(size) is not int or size < 0):
            raise CompressorError(f"{where}: files[{rel!r}].bytes: expected a byte count, got {size!r}")
        out[key] = (sha, size)
    return out


def _artifacts_table(manifest: dict[str, Any], where: str) -> dict[str, str]:
    arts = manifest.get("artifacts", {})
    if not isinstance(arts, dict):
        raise CompressorError(
            f"{where}: artifacts: expected an object of name -> path, got {type(arts).__name__}"
        )
    return {str(k): relative_path(v, f"{where}: artifacts.{k}") for k, v in arts.items()}


def onnx_external_files(path: Path) -> list[str]:
    """The external-data files an ONNX model names (relative to its folder); [] if it does
    not parse (ONNX Runtime then refuses it too)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto.FromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError):
        return []
    found: list[str] = []

    def tensors(t: Any) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.extend(e.value for e in t.external_data if e.key == "location")

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensors(t)
        for s in g.sparse_initializer:
            tensors(s.values)
            tensors(s.indices)
        nodes(g.node)

    def nodes(ns: Any) -> None:
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    tensors(a.t)
                for t in a.tensors:
                    tensors(t)
                if a.HasField("g"):
                    graph(a.g)
                for g in a.graphs:
                    graph(g)

    graph(model.graph)
    for fn in model.functions:
        nodes(fn.node)
    return found


def check_bundle(bundle: Path) -> VerifiedBundle:
    """Every path the manifest names (``files`` and ``artifacts``, and the external data of
    its ONNX files) stays inside the bundle, passes through no symlink and is a listed file
    (a folder artifact: every file under it listed), and every listed file matches its size
    and sha256. All paths are checked before any file is opened; raises one line otherwise."""
    root = Path(bundle)
    where = str(root / MANIFEST)
    data = read_manifest_bytes(root)
    manifest = parse_manifest(data, where)
    files = files_table(manifest, where)
    artifacts = _artifacts_table(manifest, where)
    real = root.resolve()
    stats = {}
    for rel in files:
        _, st = confined_path(real, rel, f"{where}: files")
        if not stat.S_ISREG(st.st_mode):
            raise CompressorError(f"{where}: files: {rel} is not a regular file")
        stats[rel] = st
    for key, rel in artifacts.items():
        path, st = confined_path(real, rel, f"{where}: artifacts.{key}")
        if stat.S_ISREG(st.st_mode):
            if rel not in files:
                raise CompressorError(
                    f"{where}: artifacts.{key} = {rel} is not listed in files (no sha256): refused"
                )
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise CompressorError(f"{where}: artifacts.{key} = {rel} is neither a file nor a folder")
        for dirpath, dirnames, filenames in os.walk(path):  # does not follow links
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                sub = p.relative_to(real).as_posix()
                if p.is_symlink():
                    raise CompressorError(f"{where}: artifacts.{key}: {sub} is a symlink; refused")
                if name in filenames and sub not in files:
                    raise CompressorError(
                        f"{where}: artifacts.{key}: {sub} is not listed in files (no sha256): refused"
                    )
    for rel, (sha, size) in files.items():
        if size is not None and stats[rel].st_size != size:
            raise CompressorError(
                f"{root}: {rel} is {stats[rel].st_size} bytes, the manifest says {size} (corrupt bundle)"
            )
        if sha256_file(real / rel) != sha:
            raise CompressorError(f"{root}: {rel} does not match its sha256 in the manifest (corrupt bundle)")
    for rel in files:
        if rel.endswith(".onnx"):
            base = PurePosixPath(rel).parent
            for loc in onnx_external_files(real / rel):
                ext = relative_path((base / loc).as_posix(), f"{where}: {rel}: external data")
                if ext not in files:
                    raise CompressorError(
                        f"{where}: {rel}: its external data {loc!r} is not a file listed in files: refused"
                    )
    return VerifiedBundle(root, manifest, data)


def check_paths(bundle: Path, manifest: dict[str, Any]) -> None:
    """The artifacts of a bundle still being written (not yet hashed) stay inside it: no
    ``..``, no absolute path, no symlink (``check_bundle`` checks a finished one whole)."""
    where = str(Path(bundle) / MANIFEST)
    real = Path(bundle).resolve()
    for key, rel in _artifacts_table(manifest, where).items():
        confined_path(real, rel, f"{where}: artifacts.{key}")


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """``check_bundle``: paths and hashes; returns the manifest."""
    return check_bundle(bundle).manifest
