"""The bundle's ``manifest.json``: its typed top level, and reading it back safely.

``Manifest`` names every top-level key a compile writes (recipe, target, model, data, pass
history with metrics, verification, benchmark, artifacts and files with sha256, tools), so
the code that fills it is checked by the type checker instead of by string keys. Its
``to_dict`` writes the keys in the order compiles have always written them, so the JSON on
disk is unchanged; keys it does not know (a newer writer's) are kept in ``extra``. Reading is
bounded and strict: a manifest comes from a folder the user handed us.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MANIFEST_MAX_BYTES = 64 << 20  # a manifest is kilobytes; this bounds what a hostile one costs
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


# The optional top-level keys, in the order a compile writes them (after format_version,
# artifacts, files); a key whose value is None is not written.
_OPTIONAL = (
    "name",
    "recipe",
    "target",
    "model",
    "data",
    "batch_invariance",
    "passes",
    "verification",
    "benchmark_skipped",
    "benchmark",
    "created_utc",
    "tools",
)


@dataclass
class Manifest:
    """The top level of ``manifest.json``. ``artifacts`` maps an export's name to its path in
    the bundle, ``files`` each file's path to ``{"sha256", "bytes"}``; ``passes`` holds each
    pass's ``PassResult.to_dict()``, ``verification`` each exporter's check record."""

    format_version: int = FORMAT_VERSION
    artifacts: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str | None = None
    recipe: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    batch_invariance: dict[str, Any] | None = None
    passes: list[dict[str, Any]] | None = None
    verification: dict[str, Any] | None = None
    benchmark_skipped: str | None = None
    benchmark: dict[str, Any] | None = None
    created_utc: str | None = None
    tools: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order compiles write them."""
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "artifacts": self.artifacts,
            "files": self.files,
        }
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """A manifest from its JSON object (as ``parse_manifest`` returns it); the values are
        taken as they are: ``check_bundle`` is what checks paths and hashes."""
        known = {"format_version", "artifacts", "files", *_OPTIONAL}
        fields: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
        return cls(**fields, extra={k: v for k, v in raw.items() if k not in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def read_manifest_bytes(bundle: Path) -> bytes:
    """The exact bytes of ``bundle/manifest.json`` (a regular file, not a link, bounded size)."""
    path = Path(bundle) / MANIFEST
    try:
        st = os.lstat(path)
    except OSError:
        raise CompressorError(f"{bundle}: not a bundle (no {MANIFEST})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CompressorError(f"{path}: is a symlink; a bundle's manifest is its own file")
    if not stat.S_ISREG(st.st_mode):
        raise CompressorError(f"{bundle}: not a bundle ({MANIFEST} is not a regular file)")
    if st.st_size > MANIFEST_MAX_BYTES:
        raise CompressorError(
            f"{path}: {st.st_size} bytes, past the {MANIFEST_MAX_BYTES} a manifest may have"
        )
    with open(path, "rb") as f:
        return f.read(MANIFEST_MAX_BYTES + 1)


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CompressorError(f"{where}: manifest is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CompressorError(f"{where}: manifest is not valid JSON: {e}") from None
    except RecursionError:
        raise CompressorError(f"{where}: manifest is nested too deeply to be one this tool wrote") from None
    if not isinstance(manifest, dict):
        raise CompressorError(f"{where}: manifest is a JSON {type(manifest).__name__}, not an object")
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    return parse_manifest(read_manifest_bytes(bundle), str(Path(bundle) / MANIFEST))
