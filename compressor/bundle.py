"""The bundle: the compiler's product, written atomically.

A bundle is a directory with ``manifest.json`` (recipe, target, tool versions, pass
history with metrics, artifacts with sha256) beside the artifacts and a report.
Everything is written into a hidden temporary directory next to the destination and
renamed into place only once complete, so an interrupted or failed compile leaves no
directory that looks like a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from compressor.errors import CompressorError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_TOOLS = (
    "torch",
    "onnx",
    "onnxruntime",
    "transformers",
    "triton",
    "diffusers",
    "numpy",
    "compressed-tensors",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    from compressor import __version__

    out = {"python": platform.python_version(), "compressor": __version__}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class BundleWriter:
    """Context manager: ``with BundleWriter(out) as b: ...`` writes ``out`` whole or not at all."""

    def __init__(self, out_dir: Path, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "artifacts": {}, "files": {}}
        self.path: Path | None = None

    def __enter__(self) -> BundleWriter:
        if self.out_dir.exists() and not self.overwrite:
            raise CompressorError(f"{self.out_dir} already exists; pass --overwrite or choose another --out")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        return self

    def add_artifacts(self, artifacts: dict[str, str]) -> None:
        assert self.path is not None
        for key, rel in artifacts.items():
            if not (self.path / rel).exists():
                raise CompressorError(f"exporter reported artifact {key}={rel}, but it was not written")
            self.manifest["artifacts"][key] = rel

    def write_text(self, rel: str, text: str) -> None:
        assert self.path is not None
        (self.path / rel).write_text(text, encoding="utf-8")

    def _finalize(self) -> None:
        assert self.path is not None
        files = {}
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                rel = p.relative_to(self.path).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        self.manifest["files"] = files
        self.manifest["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest["tools"] = tool_versions()
        with open(self.path / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, old)
        os.replace(self.path, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._finalize()
        elif self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise CompressorError(f"{bundle}: not a bundle (no {MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompressorError(f"{path}: manifest is not valid JSON: {e}") from None


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """Check every file listed in the manifest against its sha256; returns the manifest."""
    manifest = read_manifest(bundle)
    for rel, info in manifest.get("files", {}).items():
        p = Path(bundle) / rel
        if not p.is_file():
            raise CompressorError(f"{bundle}: {rel} is listed in the manifest but missing")
        if sha256_file(p) != info["sha256"]:
            raise CompressorError(
                f"{bundle}: {rel} does not match its sha256 in the manifest (corrupt bundle)"
            )
    return manifest
