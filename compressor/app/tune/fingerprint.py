"""The host an engine profile was measured on, as a key a timing cache can trust.

ONNX Runtime's int8 GEMM speed depends on the CPU's instruction set (AVX-512 VNNI makes
int8 several times faster than fp32; AVX2 barely), on the runtime's version and on the
threads it runs with; a latency measured under one of these says nothing about another.
The fingerprint holds exactly those facts, and its ``key`` (a hash of them) names the
cache file, the way TensorRT's timing cache is tied to one GPU and TensorRT version: a
change in any of them makes a fresh profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

# the x86 / Arm features that decide int8 and fp32 GEMM speed in the CPU engines
ISA_FLAGS = frozenset(
    {
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "asimd",
        "asimddp",
        "i8mm",
        "sve",
    }
)


@dataclass(frozen=True)
class HostFingerprint:
    """What a latency measured here depends on."""

    cpu: str  # model name
    isa: tuple[str, ...]  # the GEMM-relevant feature flags, sorted
    engine: str  # "onnxruntime 1.32.0"
    threads: int
    device: str = "cpu"  # "cpu" or a GPU's name and compute capability

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        if self.device != "cpu":
            return f"{self.device}: {self.cpu}, {self.engine}"
        isa = " ".join(self.isa) or "no known GEMM flags"
        return f"{self.cpu} ({isa}), {self.engine}, {self.threads} thread(s)"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "isa": list(self.isa), "key": self.key}


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and its GEMM-relevant flags (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return name, ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return name, tuple(sorted(flags & ISA_FLAGS))


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__}"


def cpu_fingerprint(threads: int) -> HostFingerprint:
    """This host's fingerprint for ONNX Runtime on the CPU with ``threads`` intra-op threads."""
    cpu, isa = cpu_model_and_flags()
    return HostFingerprint(cpu=cpu, isa=isa, engine=onnxruntime_version(), threads=threads)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
