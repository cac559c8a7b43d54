"""`tensorrt` exporter: the TensorRT engine build for a bundle's GPU target.

A TensorRT engine (plan) is specific to the GPU architecture and the TensorRT version
that built it, so the bundle carries what builds it rather than only a plan:
``build_engine_<target>.sh`` next to the Q/DQ ONNX (``compressor.exporters.onnx.onnx_qdq``),
a ``trtexec`` call with

- ``--stronglyTyped``: the Q/DQ graph fixes every precision (explicit quantization; no
  implicit int8 calibration, no precision flags);
- ``--minShapes / --optShapes / --maxShapes`` for every dynamic input, from this
  export's ``batch`` and ``sequence`` ranges;
- ``--sparsity=enable`` when the model's int8 weights carry a 2:4 mask (A100, H100 and
  Orin have 2:4 sparse tensor cores);
- ``--timingCacheFile`` (kernel timings reused across builds) and
  ``--memPoolSize=workspace:<MiB>M``.

The script checks that it runs on the target (the GPU's compute capability; for Orin,
a Jetson: engines for Orin are built on the device). The CPU target has no TensorRT
engine and is refused at plan time.

:func:`build_engine` does the same build through TensorRT's Python API
(``trt.Builder``, ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``trt.OnnxParser``,
an optimization profile, ``BuilderFlag.SPARSE_WEIGHTS``, the timing cache and the
workspace pool limit). The exporter calls it only where ``import tensorrt`` works and
a GPU of the target's architecture is present; TensorRT cannot be installed on the
machines this project is developed on, so engine builds are verified only where
TensorRT exists.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compressor.config import option
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.exporters.onnx.onnx_qdq import QDQ_FILE
from compressor.planning import PlanState
from compressor.targets import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeProfile:
    """The min / opt / max shape of one input in a TensorRT optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _check_range(value: tuple[int, ...], path: str) -> None:
    if len(value) != 3 or not 1 <= value[0] <= value[1] <= value[2]:
        raise RecipeError(f"{path}: {list(value)} must be [min, opt, max] with 1 <= min <= opt <= max")


@dataclass(frozen=True)
class TensorRTBuildConfig:
    onnx: str = option(QDQ_FILE, help="the Q/DQ ONNX inside the bundle (written by the onnx_qdq export)")
    batch: tuple[int, ...] = option((1, 32, 32), help="[min, opt, max] of the dynamic 'batch' axis")
    sequence: tuple[int, ...] = option(
        (1, 128, 128), help="[min, opt, max] of the dynamic 'sequence' axis (token length)"
    )
    workspace_mib: int = option(4096, help="TensorRT workspace memory pool limit, MiB")
    timing_cache: str = option(
        "timing.cache", help="timing cache file next to the script (reused across builds)"
    )
    build: Literal["auto", "never"] = option(
        "auto",
        help="auto: also build the plan during the compile where TensorRT and the target GPU are present",
    )

    def validate(self, path: str) -> None:
        _check_range(self.batch, f"{path}.batch")
        _check_range(self.sequence, f"{path}.sequence")
        if self.workspace_mib < 1:
            raise RecipeError(f"{path}.workspace_mib: must be at least 1")
        for key in ("onnx", "timing_cache"):
            value = getattr(self, key)
            if not value or "/" in value:
                raise RecipeError(f"{path}.{key}: {value!r} must be a plain file name")

    def axes(self) -> dict[str, tuple[int, ...]]:
        return {"batch": self.batch, "sequence": self.sequence}


def plan_name(target: Target) -> str:
    return f"model_{target.name}.plan"


def shape_profiles(onnx_path: Path, axes: dict[str, tuple[int, ...]]) -> dict[str, ShapeProfile]:
    """A profile for every graph input with a dynamic dimension; ``axes`` maps a dim name to
    [min, opt, max]. Fixed dimensions keep their size."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    profiles: dict[str, ShapeProfile] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shapes: list[list[int]] = [[], [], []]
        dynamic = False
        for dim in inp.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                for s in shapes:
                    s.append(dim.dim_value)
                continue
            dynamic = True
            name = dim.dim_param
            if name not in axes:
                raise ExportError(
                    f"{onnx_path.name}: input {inp.name} has a dynamic dimension {name!r} with no range; "
                    f"known ranges: {', '.join(axes)}"
                )
            for s, v in zip(shapes, axes[name]):
                s.append(int(v))
        if dynamic:
            profiles[inp.name] = ShapeProfile(tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]))
    return profiles


def _shape_arg(profiles: dict[str, ShapeProfile], which: str) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in getattr(p, which))}" for n, p in profiles.items())


def trtexec_args(
    target: Target,
    onnx_name: str,
    profiles: dict[str, ShapeProfile],
    sparse: bool,
    timing_cache: str,
    workspace_mib: int,
) -> list[str]:
    """The ``trtexec`` arguments that build ``onnx_name`` into ``model_<target>.plan``."""
    if target.device != "cuda":
        raise PlanError(f"target {target.name!r} has no TensorRT engine (TensorRT runs on NVIDIA GPUs)")
    if sparse and not target.sparse_24:
        raise PlanError(f"target {target.name!r} has no 2:4 sparse tensor cores; build without sparsity")
    args = [f"--onnx={onnx_name}", f"--saveEngine={plan_name(target)}", "--stronglyTyped"]
    if profiles:
        args += [f"--{w}Shapes={_shape_arg(profiles, w)}" for w in ("min", "opt", "max")]
    if sparse:
        args.append("--sparsity=enable")
    args += [f"--timingCacheFile={timing_cache}", f"--memPoolSize=workspace:{workspace_mib}M"]
    return args


def trtexec_command(
    target: Target,
    onnx_name: str,
    profiles: dict[str, ShapeProfile],
    sparse: bool,
    timing_cache: str,
    workspace_mib: int,
) -> str:
    """One shell line: ``trtexec --onnx=... --saveEngine=... --stronglyTyped ...``."""
    args = trtexec_args(target, onnx_name, profiles, sparse, timing_cache, workspace_mib)
    return " ".join(["trtexec", *(shlex.quote(a) for a in args)])


def build_script(
    target: Target,
    onnx_name: str,
    profiles: dict[str, ShapeProfile],
    sparse: bool,
    timing_cache: str,
    workspace_mib: int,
) -> str:
    """The bash script that checks it runs on ``target`` and calls ``trtexec``."""
    args = " ".join(
        shlex.quote(a) for a in trtexec_args(target, onnx_name, profiles, sparse, timing_cache, workspace_mib)
    )
    cc = target.compute_capability
    assert cc is not None
    want = f"{cc[0]}.{cc[1]}"
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine {plan_name(target)} for target {target.name} ({target.description})",
        f"# from {onnx_name} (explicit Q/DQ, strongly typed). An engine is specific to the GPU",
        "# architecture and the TensorRT version that builds it: run this where the engine will run.",
        "# Needs TensorRT's trtexec (on PATH, or set TRTEXEC=/path/to/trtexec).",
        f"# The command: trtexec {args}",
    ]
    if target.build_on_device:
        lines += [
            "# NOTE: this must run on the Jetson itself (target orin): Jetson engines are built on the",
            "# device, with the TensorRT of its JetPack; a plan built on another GPU will not load there.",
        ]
    lines += [
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'if [ ! -x "$TRTEXEC" ]; then',
        '  echo "error: trtexec not found; install TensorRT or set TRTEXEC=/path/to/trtexec" >&2',
        "  exit 2",
        "fi",
    ]
    if target.build_on_device:
        lines += [
            'if [ ! -e /etc/nv_tegra_release ] && [ -z "${COMPRESSOR_SKIP_TARGET_CHECK:-}" ]; then',
            f'  echo "error: this is not a Jetson; the {target.name} engine must be built on the device" >&2',
            "  exit 2",
            "fi",
        ]
    else:
        lines += [
            'if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${COMPRESSOR_SKIP_TARGET_CHECK:-}" ]; then',
            "  have=\"$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')\"",
            f'  if [ "$have" != "{want}" ]; then',
            f'    echo "error: this GPU has compute capability $have; the {target.name} engine needs '
            f'{want} ({target.arch})" >&2',
            "    exit 2",
            "  fi",
            "fi",
        ]
    lines.append(f'exec "$TRTEXEC" {args}')
    return "\n".join(lines) + "\n"


def has_24_masks(model: nn.Module) -> bool:
    """Whether any int8 layer of ``model`` carries a 2:4 sparsity mask."""
    return any(getattr(m, "weight_mask", None) is not None for m in model.modules())


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profiles: dict[str, ShapeProfile],
    sparse: bool,
    timing_cache: Path | None,
    workspace_mib: int,
) -> dict[str, Any]:
    """Build ``plan_path`` from the Q/DQ ONNX with TensorRT's Python API (strongly typed).

    Needs ``tensorrt`` and a GPU. The timing cache is loaded when the file exists and
    written back after the build. The plan is written whole or not at all."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(
            "building a TensorRT engine needs the tensorrt Python package (pip install tensorrt, on a "
            "machine with an NVIDIA GPU); or run the bundle's build_engine_<target>.sh where TensorRT is"
        ) from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path.name}: TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, p in profiles.items():
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    tmp = plan_path.with_name(plan_path.name + ".partial")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"plan_bytes": plan_path.stat().st_size, "tensorrt": str(trt.__version__)}


def why_not_build_here(target: Target) -> str | None:
    """None when this machine can build ``target``'s engine, else the reason it cannot."""
    if target.build_on_device:
        return f"{target.name} engines are built on the device (run the script on the Jetson)"
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed here"
    if not torch.cuda.is_available():
        return "no GPU here"
    have = torch.cuda.get_device_capability()
    if have != target.compute_capability:
        return f"this GPU is sm_{have[0]}{have[1]}, the target is {target.arch}"
    return None


@register_exporter
class TensorRTExporter(Exporter):
    name = "tensorrt"
    description = (
        "TensorRT engine build script (trtexec, strongly typed, 2:4 sparsity, shape profiles) "
        "for the Q/DQ ONNX; builds the plan here when TensorRT and the target GPU are present"
    )
    Config = TensorRTBuildConfig

    consumes = ("onnx_qdq",)

    def check_plan(self, state: PlanState) -> None:
        self.check(state.target)
        if self.config.onnx not in state.written().get("onnx_qdq", ()):
            at = state.where.split(" (")[0]  # exports[i]
            raise RecipeError(
                f"{at}: tensorrt builds from the Q/DQ ONNX {self.config.onnx!r}, which no earlier export "
                "writes: add `- format: onnx_qdq` before `- format: tensorrt` in exports"
            )

    def check(self, target: Target) -> None:
        if target.device != "cuda" or "tensorrt" not in target.engines:
            raise PlanError(
                f"exports: tensorrt has no engine for target {target.name!r}: TensorRT runs on NVIDIA GPUs; "
                "use target a100, h100 or orin, or export format onnx for ONNX Runtime on the CPU"
            )

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        cfg = self.config
        target = ctx.target
        self.check(target)
        onnx_path = out_dir / cfg.onnx
        if not onnx_path.is_file():
            raise RecipeError(
                f"exports: tensorrt builds from the Q/DQ ONNX {cfg.onnx!r}, which this recipe did not write: "
                "add `- format: onnx_qdq` before `- format: tensorrt` in exports"
            )
        sparse = has_24_masks(model) and target.sparse_24
        profiles = shape_profiles(onnx_path, cfg.axes())
        script_name = f"build_engine_{target.name}.sh"
        script = out_dir / script_name
        script.write_text(
            build_script(target, cfg.onnx, profiles, sparse, cfg.timing_cache, cfg.workspace_mib),
            encoding="utf-8",
        )
        script.chmod(0o755)
        report: dict[str, Any] = {
            "script": script_name,
            "command": trtexec_command(
                target, cfg.onnx, profiles, sparse, cfg.timing_cache, cfg.workspace_mib
            ),
            "plan": plan_name(target),
            "sparse_24": sparse,
            "profiles": {n: {"min": p.min, "opt": p.opt, "max": p.max} for n, p in profiles.items()},
        }
        artifacts = {"tensorrt_build": script_name}
        reason = "build: never" if cfg.build == "never" else why_not_build_here(target)
        if reason is None:
            log.info("building %s with TensorRT", plan_name(target))
            report.update(
                build_engine(
                    onnx_path,
                    out_dir / plan_name(target),
                    profiles,
                    sparse,
                    out_dir / cfg.timing_cache,
                    cfg.workspace_mib,
                )
            )
            artifacts["tensorrt_plan"] = plan_name(target)
        report["engine_built"] = reason is None
        if reason is not None:
            report["not_built_because"] = reason
            log.info("TensorRT engine not built during the compile: %s", reason)
        return ExportResult(artifacts=artifacts, verification={"tensorrt_build": report})
