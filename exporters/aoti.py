"""`aoti` exporter: an AOTInductor package (``model.pt2``) of the compressed model, and the
program capture and verification it shares with `torch_export` (``torch_export.py``, the
``torch.export`` program itself).

The adapter's export module (for BERT encoders the layer-by-layer ``BertEncoderGraph``;
its torch path, not the ONNX-only fused attention) is captured with ``torch.export``
with the adapter's dynamic axes as ``torch.export.Dim`` (batch and, for text models,
sequence length), then compiled ahead of time by Inductor into a shared library
packaged with its weights (``torch._inductor.aoti_compile_and_package``). A Python
process loads it with ``torch._inductor.aoti_load_package``; a C++ one with
``torch::inductor::AOTIModelPackageLoader`` (libtorch), with no Python at all.

The quantized layers export as they run: ``Int8Linear``'s CPU forward is plain torch
ops (an exact emulation of the int8 engine's rounding), so the package computes
exactly what the pipeline measured. For a CUDA target the package must be compiled on
a CUDA machine (Inductor generates Triton kernels for the GPU it sees);
``max_autotune`` then benchmarks GEMM configurations at compile time (it does nothing
useful on the CPU and is refused there).

Verification is part of both exports: the file is loaded back and compared with the
torch model on held-out inputs of several batch sizes and lengths, all different from
the example the export was traced with; below ``min_cosine`` the export fails and the
file is removed. On a CPU, compiling needs a C++ compiler (g++ or clang).
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.config import option
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.targets import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgramExportConfig:
    """What the ``aoti`` and ``torch_export`` exports share: the captured program's dynamic
    shapes and how the written file is checked against torch."""

    max_batch: int = option(1024, help="largest batch size the program accepts (the dynamic dim's bound)")
    max_length: int = option(
        0, help="largest sequence length accepted; 0 = the model's max_position_embeddings, if it has one"
    )
    verify_batch_sizes: tuple[int, ...] = option((1, 5), help="batch sizes checked after loading it back")
    verify_lengths: tuple[int, ...] = option((9, 24), help="sequence lengths checked after loading")
    min_cosine: float = option(0.999, help="fail when any output's cosine vs torch is below this")

    def validate(self, path: str) -> None:
        file: str = getattr(self, "file", "")
        if "/" in file or not file.endswith(".pt2"):
            raise RecipeError(f"{path}.file: {file!r} must be a plain file name ending in .pt2")
        if self.max_batch < 2:
            raise RecipeError(f"{path}.max_batch: {self.max_batch} must be at least 2 (the batch is dynamic)")
        if self.max_length < 0:
            raise RecipeError(f"{path}.max_length: must be 0 (the model's limit) or positive")
        if not self.verify_batch_sizes or any(b < 1 or b > self.max_batch for b in self.verify_batch_sizes):
            raise RecipeError(
                f"{path}.verify_batch_sizes: {list(self.verify_batch_sizes)} must be non-empty, each in "
                f"[1, max_batch={self.max_batch}]"
            )
        if any(t < 1 for t in self.verify_lengths):
            raise RecipeError(f"{path}.verify_lengths: every length must be at least 1")
        if not 0 < self.min_cosine <= 1:
            raise RecipeError(f"{path}.min_cosine: {self.min_cosine} is not in (0, 1]")


@dataclass(frozen=True)
class AotiExportConfig(ProgramExportConfig):
    file: str = option("model.pt2", help="package file name inside the bundle")
    max_autotune: bool = option(
        False, help="autotune GEMM kernels while compiling (CUDA targets only; slower compile)"
    )


def _dim_name(axis: str) -> str:
    name = re.sub(r"\W", "_", axis)
    return name if name and not name[0].isdigit() else f"d_{name}"


def dynamic_shapes(
    input_names: tuple[str, ...],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    max_batch: int,
    max_length: int | None,
) -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic shapes from ONNX-style ``dynamic_axes`` (axis name -> one Dim).

    Inputs sharing an axis name share the Dim (input_ids and attention_mask have one length).
    Axis 0 is bounded by ``max_batch``, other axes by ``max_length`` (None: unbounded)."""
    dims: dict[str, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for name in input_names:
        out[name] = {}
        for axis, axis_name in dynamic_axes.get(name, {}).items():
            if axis_name not in dims:
                upper = max_batch if axis == 0 else max_length
                dims[axis_name] = torch.export.Dim(_dim_name(axis_name), min=1, max=upper)
            out[name][axis] = dims[axis_name]
    return out


def _model_max_length(model: nn.Module) -> int | None:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _cosine_min(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().flatten(1), ref.float().flatten(1)
    cos = (out * ref).sum(-1) / (out.norm(dim=-1) * ref.norm(dim=-1) + 1e-12)
    return float(cos.min())


@dataclass
class CapturedProgram:
    """The adapter's export graph captured by ``torch.export`` with dynamic batch and length,
    and the held-out cases (with the torch model's outputs) the written file is checked on."""

    program: torch.export.ExportedProgram
    input_names: tuple[str, ...]
    cases: list[dict[str, torch.Tensor]]
    refs: list[torch.Tensor]
    device: torch.device
    max_length: int | None
    export_seconds: float


def check_program_target(fmt: str, target: Target) -> None:
    if target.device == "cuda" and not torch.cuda.is_available():
        raise PlanError(
            f"{fmt}: target {target.name!r} needs the program captured on a CUDA GPU and this machine "
            f"has none; compile the recipe on a GPU machine or drop the {fmt} export"
        )


def capture_program(
    model: nn.Module, ctx: ExportContext, cfg: ProgramExportConfig, fmt: str
) -> CapturedProgram:
    device = torch.device("cuda" if ctx.target.device == "cuda" else "cpu")
    source = max(ctx.data.eval, key=lambda b: next(iter(b.values())).numel())
    cases = ctx.adapter.verification_cases(source, cfg.verify_batch_sizes, cfg.verify_lengths)
    with torch.no_grad():  # the reference first, on the untouched model (see exporters/onnx/onnx.py)
        model.eval()
        refs = [ctx.adapter.forward(model, c).float() for c in cases]

    example = ctx.adapter.verification_cases(ctx.data.eval[0], (2,), (16,))[0]
    spec = ctx.adapter.export_spec(copy.deepcopy(model).eval(), example)
    module = spec.module.to(device).eval()
    max_length = cfg.max_length or _model_max_length(model)
    shapes = dynamic_shapes(spec.input_names, spec.dynamic_axes, cfg.max_batch, max_length)
    args = tuple(x.to(device) for x in spec.example_inputs)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch's message names the op or guard that failed
        raise ExportError(f"{fmt}: torch.export could not capture the model: {e}") from e
    return CapturedProgram(
        ep, spec.input_names, cases, refs, device, max_length, round(time.perf_counter() - t0, 2)
    )


def verify_program(
    run: Callable[..., Any], file: str, what: str, cap: CapturedProgram, min_cosine: float
) -> dict[str, Any]:
    """Run the loaded program on the captured cases; ExportError below ``min_cosine``."""
    worst_cos, worst_abs = 1.0, 0.0
    with torch.no_grad():
        for case, ref in zip(cap.cases, cap.refs):
            out = run(*(case[n].to(cap.device) for n in cap.input_names))
            out = (out[0] if isinstance(out, (list, tuple)) else out).float().cpu()
            if out.shape != ref.shape:
                raise ExportError(
                    f"{file}: {what} output shape {tuple(out.shape)} != torch {tuple(ref.shape)}"
                )
            if not torch.isfinite(out).all():
                raise ExportError(f"{file}: the {what} produced NaN/inf")
            worst_cos = min(worst_cos, _cosine_min(out, ref))
            worst_abs = max(worst_abs, float((out - ref).abs().max()))
    if worst_cos < min_cosine:
        raise ExportError(
            f"{file}: the {what} disagrees with torch: min cosine {worst_cos:.5f} < {min_cosine} over "
            f"{len(cap.cases)} held-out cases; the bundle was not written"
        )
    return {
        "cases": len(cap.cases),
        "shapes": [list(next(iter(c.values())).shape) for c in cap.cases],
        "min_cosine": worst_cos,
        "max_abs_error": worst_abs,
        "inputs": list(cap.input_names),
        "device": str(cap.device),
        "max_length": cap.max_length,
        "export_seconds": cap.export_seconds,
    }


@register_exporter
class AotiExporter(Exporter):
    name = "aoti"
    description = "AOTInductor package (model.pt2) from torch.export with dynamic batch/length, verified"
    Config = AotiExportConfig

    def check(self, target: Target) -> None:
        if "aoti" not in target.engines:
            raise PlanError(
                f"aoti: target {target.name!r} does not run AOTInductor packages (engines: "
                f"{', '.join(target.engines)}); use the onnx export for it"
            )
        check_program_target("aoti", target)
        if self.config.max_autotune and target.device != "cuda":
            raise PlanError("aoti.max_autotune: autotuning only applies to CUDA targets; set it to false")
        if target.device == "cpu" and shutil.which("g++") is None and shutil.which("clang++") is None:
            raise PlanError("aoti: compiling for the CPU needs a C++ compiler; install g++ (or clang++)")

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        import torch._inductor  # heavy; only when a recipe asks for a package

        cfg = self.config
        cap = capture_program(model, ctx, cfg, "aoti")
        path = out_dir / cfg.file
        partial = out_dir / f".partial-{cfg.file}"  # the packager wants a .pt2 name
        log.info("compiling %s with AOTInductor on %s", path.name, cap.device)
        t1 = time.perf_counter()
        try:
            options = {"max_autotune": True} if cfg.max_autotune else {}
            torch._inductor.aoti_compile_and_package(
                cap.program, package_path=str(partial), inductor_configs=options
            )
            t2 = time.perf_counter()
            runner = torch._inductor.aoti_load_package(str(partial))
            report = verify_program(runner, cfg.file, "AOTInductor package", cap, cfg.min_cosine)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        # sample inputs for the native runner (compressor-run BUNDLE), in call order
        from compressor.exporters.runner_inputs import write_runner_inputs

        largest = max(cap.cases, key=lambda c: next(iter(c.values())).numel())
        write_runner_inputs(out_dir, {n: largest[n] for n in cap.input_names})
        report.update(
            {
                "compile_seconds": round(t2 - t1, 2),
                "max_batch": cfg.max_batch,
                "max_autotune": cfg.max_autotune,
            }
        )
        log.info("%s: compiled in %.1f s, min cosine %.5f", path.name, t2 - t1, report["min_cosine"])
        return ExportResult(artifacts={"aoti": cfg.file}, verification={"aoti": report})
