"""Target records: what each deployment target can run, and how fast.

A target decides what is legal (FP8 exists only on Hopper here, 2:4 sparse tensor
cores only on Ampere and later) and gives the peak rates the reports compare
against. The peak figures are the vendors' published dense tensor-core rates for the
named SKU (A100 SXM4 80 GB, H100 SXM5, Jetson AGX Orin 64 GB); sparse rates are the
2:4 rates. The CPU record has no fixed peak: it is whatever machine runs ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")
ENGINES: tuple[str, ...] = ("onnxruntime", "tensorrt", "aoti", "torch")


@dataclass(frozen=True)
class Target:
    """One deployment target.

    ``int4`` in ``precisions`` means weight-only int4 (W4A16 on GPUs, MatMulNBits in
    ONNX Runtime on the CPU): a storage format every target can dequantize, not an
    int4 tensor-core mode.
    """

    name: str
    description: str
    device: str  # "cpu" or "cuda": where the engine runs
    arch: str | None  # "sm_80" etc.; None for the CPU
    precisions: frozenset[str]
    sparse_24: bool  # 2:4 sparse tensor cores
    peak_tflops: Mapping[str, float] = field(default_factory=dict)  # dense, per precision
    sparse_peak_tflops: Mapping[str, float] = field(default_factory=dict)
    memory_bandwidth_gbs: float | None = None
    engines: tuple[str, ...] = ()
    build_on_device: bool = False  # engines must be built on the target itself (Jetson)

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        if self.arch is None:
            return None
        digits = self.arch.removeprefix("sm_")
        return int(digits[:-1]), int(digits[-1])

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def require_precision(self, precision: str, what: str) -> None:
        """Raise a plan error naming the legal precisions when ``precision`` is illegal here."""
        from compressor.errors import PlanError

        if precision not in PRECISIONS:
            raise PlanError(f"{what}: unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        if not self.supports(precision):
            legal = ", ".join(p for p in PRECISIONS if p in self.precisions)
            hint = " FP8 needs an sm_89+ GPU: use target h100." if precision == "fp8" else ""
            raise PlanError(
                f"{what}: {precision} is not supported on target {self.name!r} (supported: {legal}).{hint}"
            )


TARGETS: dict[str, Target] = {
    "cpu": Target(
        name="cpu",
        description="x86-64 / Arm CPU running ONNX Runtime (int8 through VNNI / dot-product GEMMs)",
        device="cpu",
        arch=None,
        precisions=frozenset({"fp32", "int8", "int4"}),
        sparse_24=False,
        engines=("onnxruntime", "aoti", "torch"),
    ),
    "a100": Target(
        name="a100",
        description="NVIDIA A100 SXM4 80GB (Ampere, sm_80)",
        device="cuda",
        arch="sm_80",
        precisions=frozenset({"fp32", "fp16", "bf16", "int8", "int4"}),
        sparse_24=True,
        peak_tflops={"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "int8": 624.0},
        sparse_peak_tflops={"tf32": 312.0, "fp16": 624.0, "bf16": 624.0, "int8": 1248.0},
        memory_bandwidth_gbs=2039.0,
        engines=("tensorrt", "onnxruntime", "aoti", "torch"),
    ),
    "h100": Target(
        name="h100",
        description="NVIDIA H100 SXM5 80GB (Hopper, sm_90)",
        device="cuda",
        arch="sm_90",
        precisions=frozenset({"fp32", "fp16", "bf16", "int8", "fp8", "int4"}),
        sparse_24=True,
        peak_tflops={
            "fp32": 67.0,
            "tf32": 494.7,
            "fp16": 989.4,
            "bf16": 989.4,
            "fp8": 1978.9,
            "int8": 1978.9,
        },
        sparse_peak_tflops={"tf32": 989.4, "fp16": 1978.9, "bf16": 1978.9, "fp8": 3957.8, "int8": 3957.8},
        memory_bandwidth_gbs=3350.0,
        engines=("tensorrt", "onnxruntime", "aoti", "torch"),
    ),
    "orin": Target(
        name="orin",
        description="NVIDIA Jetson AGX Orin 64GB (Ampere, sm_87); engines are built on the device",
        device="cuda",
        arch="sm_87",
        precisions=frozenset({"fp32", "fp16", "bf16", "int8", "int4"}),
        sparse_24=True,
        peak_tflops={"fp32": 5.3, "fp16": 42.5, "bf16": 42.5, "int8": 85.0},
        sparse_peak_tflops={"fp16": 85.0, "bf16": 85.0, "int8": 170.0},
        memory_bandwidth_gbs=204.8,
        engines=("tensorrt", "onnxruntime", "torch"),
        build_on_device=True,
    ),
}


def get_target(name: str) -> Target:
    from compressor.errors import PlanError

    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise PlanError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None


def format_targets_table() -> str:
    """A plain-text table of every target, for `compressor targets`."""
    header = ("target", "arch", "precisions", "2:4", "int8 TOPS (dense/sparse)", "GB/s", "engines", "build")
    rows = [header]
    for t in TARGETS.values():
        int8 = t.peak_tflops.get("int8")
        int8_sparse = t.sparse_peak_tflops.get("int8")
        rows.append(
            (
                t.name,
                t.arch or "-",
                ",".join(p for p in PRECISIONS if p in t.precisions),
                "yes" if t.sparse_24 else "no",
                f"{int8:g}/{int8_sparse:g}" if int8 and int8_sparse else "-",
                f"{t.memory_bandwidth_gbs:g}" if t.memory_bandwidth_gbs else "-",
                ",".join(t.engines),
                "on device" if t.build_on_device else "anywhere",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
