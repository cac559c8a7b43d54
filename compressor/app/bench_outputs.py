"""What ``compressor bench`` writes: bench.json, bench.md and report.html, replacing only
results an earlier bench wrote, each file whole or not at all.

Apart from the CLI module so that its checks can be tested, and reused, without a parser.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from compressor.errors import CompressorError

BENCH_FILES = ("bench.json", "bench.md", "report.html")


def _is_bench_result(path: Path) -> bool:
    """``path`` is a regular file holding a result ``compressor bench`` wrote."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 << 20:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"device", "engines", "latency"} <= data.keys()


def check_bench_outputs(out: Path, json_path: Path | None) -> None:
    """bench replaces only what an earlier bench wrote: ``out`` is a new or existing folder
    whose bench.json / bench.md / report.html, if any, sit beside a bench.json of ours, and
    ``--json`` names a new file or an earlier bench result; anything else is the user's."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CompressorError(f"bench --out {out}: exists and is not a folder; choose another --out")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CompressorError(f"bench --out {out}: {parent} is a file; choose another --out")
    present = [n for n in BENCH_FILES if os.path.lexists(out / n)]
    if present and not _is_bench_result(out / "bench.json"):
        raise CompressorError(
            f"bench --out {out}: holds {', '.join(present)} that compressor bench did not write; "
            "choose another --out (bench replaces only its own results)"
        )
    if json_path is not None and os.path.lexists(json_path) and not _is_bench_result(json_path):
        raise CompressorError(
            f"bench --json {json_path}: exists and is not a compressor bench result; choose another path"
        )


def write_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (temporary file beside it, then rename)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a report is as readable as write_text makes it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
