"""The native runner (``compressor-run``, C++ over libtorch): its input files and its build.

``compressor-run BUNDLE_DIR`` loads the bundle's AOTInductor package (``artifacts.aoti``)
and runs it on the sample inputs stored beside the package
(``compressor.exporters.runner_inputs``). The runner prints one JSON line with
``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms`` and ``throughput`` (items per second).

``build_runner`` configures and builds it with CMake against the libtorch of the
installed torch wheel (``torch.utils.cmake_prefix_path``); it needs a C++17 compiler
and CMake, which the AOTInductor CPU path needs anyway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from compressor.errors import CompressorError

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_runner(build_dir: Path, source_dir: Path = REPO_ROOT, jobs: int = 2) -> Path:
    """Configure and build ``compressor-run``; returns the executable's path."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise CompressorError(f"building compressor-run needs {tool} on PATH")
    if not (source_dir / "CMakeLists.txt").is_file():
        raise CompressorError(f"{source_dir} has no CMakeLists.txt (build from a source checkout)")
    configure = ["cmake", "-S", str(source_dir), "-B", str(build_dir)]
    configure.append(f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build_dir), "-j", str(jobs)]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise CompressorError(f"{' '.join(cmd[:2])} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    exe = build_dir / "compressor-run"
    if not exe.is_file():
        raise CompressorError(f"the build finished but {exe} is missing (was Torch found by CMake?)")
    return exe


def run_runner(exe: Path, bundle: Path, iters: int = 20, warmup: int = 3, threads: int = 0) -> dict[str, Any]:
    """Run ``compressor-run`` on a bundle and parse its JSON line."""
    cmd = [str(exe), str(bundle), "--iters", str(iters), "--warmup", str(warmup), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CompressorError(f"compressor-run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
