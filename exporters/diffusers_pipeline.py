"""Export a step-reduced diffusion student: a diffusers pipeline folder and the denoiser as ONNX.

The folder (``pipeline/``) is a ``StepReducedPipeline`` (the denoiser as ``unet/`` or
``transformer/`` + conditioner + the scheduler configured for the student's N steps) written by diffusers'
``save_pretrained``, plus a ``pipeline.py`` so that
``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)``
finds the class (the package must be importable).
The exporter reloads the folder and checks that it samples the same images as the
torch model for a fixed seed. ``denoiser.onnx`` is one evaluation of the student,
``(sample, timestep, class_labels[, guidance_scale]) -> noise_pred`` (class_labels index
the prompt table of a text conditioner; noise_pred is the velocity of a flow model), verified in ONNX
Runtime against torch on real-shaped inputs (max abs error and SQNR).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.config import option
from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter

log = logging.getLogger(__name__)

_PIPELINE_PY = '''"""Custom pipeline hook: DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)."""
from compressor.adapters.diffusion.step_reduced_pipeline import StepReducedPipeline  # noqa: F401
'''


@dataclass(frozen=True)
class DiffusersPipelineExportConfig:
    onnx: bool = option(True, help="also write the student denoiser as ONNX and verify it in ONNX Runtime")
    opset: int = option(17, help="ONNX opset")
    max_abs_error: float = option(1e-3, help="fail when ONNX Runtime and torch differ by more than this")
    min_int8_sqnr_db: float = option(
        30.0,
        help="for int8 students: ONNX Runtime's integer kernels round differently from torch's fake-quant, "
        "so the check is an SQNR floor instead of max_abs_error",
    )
    check_samples: int = option(4, help="images sampled from the reloaded folder and compared with torch")

    def validate(self, path: str) -> None:
        if self.opset < 14:
            raise RecipeError(f"{path}.opset: must be at least 14, got {self.opset}")
        if not self.max_abs_error > 0:
            raise RecipeError(f"{path}.max_abs_error: must be positive, got {self.max_abs_error}")


def save_pipeline(model: Any, folder: Path) -> None:
    """Write ``model`` (a DiffusionModel) as a StepReducedPipeline folder."""
    from compressor.adapters.diffusion.model import denoiser_component
    from compressor.adapters.diffusion.schedule import make_scheduler
    from compressor.adapters.diffusion.step_reduced_pipeline import StepReducedPipeline, restore_int8_layers_

    spec = model.spec
    cond = model.conditioner
    int8 = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight_scale") and hasattr(m, "act_scheme"):  # compressor Int8Linear
            if getattr(m, "smooth", None) is not None:
                raise ExportError(
                    f"{name}: SmoothQuant-smoothed int8 layers cannot be stored in a diffusers folder"
                )
            int8[name] = m.act_scheme
    # record the compiled sampling recipe and the training noise schedule in the conditioner's config
    fresh = type(cond)(
        **{
            **dict(cond.config),
            "sampler": spec.sampler,
            "num_inference_steps": spec.steps,
            "guidance": spec.guidance,
            "guidance_scale": spec.guidance_scale,
            "adaptive_guidance_threshold": spec.adaptive_guidance_threshold,
            "adaptive_guidance_warmup": spec.adaptive_guidance_warmup,
            "original_inference_steps": spec.original_inference_steps,
            "int8_layers": int8 or None,
            "noise_schedule": dict(model.train_config),
        }
    )
    fresh.load_state_dict(cond.state_dict(), strict=False)
    if int8:  # save plain Linear weights: the reloading pipeline re-wraps them from the recorded names
        restore_int8_layers_(model.unet, fresh)
    scheduler = make_scheduler(model.train_config, spec)
    denoiser = {denoiser_component(model.unet): model.unet}
    StepReducedPipeline(conditioner=fresh, scheduler=scheduler, **denoiser).save_pretrained(folder)
    (folder / "pipeline.py").write_text(_PIPELINE_PY)


def check_pipeline_reload(model: Any, folder: Path, n: int) -> float:
    """Max abs difference between images from the reloaded folder and from ``model``."""
    from compressor.adapters.diffusion.step_reduced_pipeline import StepReducedPipeline

    labels = torch.arange(n) % 10
    pipe = StepReducedPipeline.from_pretrained(folder, use_safetensors=True)
    got = pipe(
        class_labels=labels, generator=torch.Generator().manual_seed(0)
    ).images  # (B, H, W, C) in [0, 1]
    want, _ = model.sample(labels, torch.Generator().manual_seed(0))
    want = ((want + 1) / 2).permute(0, 2, 3, 1).numpy()
    return float(abs(got - want).max())


def export_denoiser_onnx(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], spec: Any, path: Path, opset: int
) -> None:
    from compressor.exporters.onnx.onnx import trace_onnx

    trace_onnx(module, inputs, spec, path, opset)
    import onnx

    from compressor.exporters.onnx.ort_int8 import encode_int8_weights_

    proto = onnx.load(str(path))
    encoding = encode_int8_weights_(proto, "auto")  # U8S8 saturates on x86 without VNNI
    if encoding["uint8_rewritten"]:
        onnx.save(proto, str(path))


def verify_onnx(
    path: Path, module: nn.Module, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...]
) -> dict[str, float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(names, inputs) if n in {i.name for i in sess.get_inputs()}}
    got = torch.from_numpy(sess.run(None, feed)[0])
    with torch.no_grad():
        want = module(*inputs)
    err = (got - want).abs().max().item()
    sqnr = 10 * math.log10(want.pow(2).mean().item() / max((got - want).pow(2).mean().item(), 1e-30))
    return {"max_abs_error": err, "sqnr_db": sqnr}


@register_exporter
class DiffusersPipelineExporter(Exporter):
    name = "diffusers-pipeline"
    description = "diffusers pipeline folder (student + N-step scheduler) and the student denoiser as ONNX"
    Config = DiffusersPipelineExportConfig

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        from compressor.adapters.diffusion.model import DiffusionModel

        if not isinstance(model, DiffusionModel):
            raise ExportError(f"{self.name}: needs a diffusion model, got {type(model).__name__}")
        out_dir.mkdir(parents=True, exist_ok=True)
        artifacts: dict[str, str] = {}
        verification: dict[str, Any] = {"steps": model.spec.steps, "sampler": model.spec.sampler}
        folder = out_dir / "pipeline"
        save_pipeline(model, folder)
        diff = check_pipeline_reload(model, folder, self.config.check_samples)
        verification["pipeline_reload_max_abs_diff"] = diff
        if diff > 1e-4:
            raise ExportError(f"{self.name}: the reloaded pipeline samples differ from torch by {diff:.3g}")
        artifacts["diffusers_pipeline"] = "pipeline"
        if self.config.onnx:
            batch = (
                ctx.data.eval[0]
                if ctx.data.eval
                else {"labels": torch.arange(4), "images": torch.zeros(4, 1, 8, 8)}
            )
            spec = ctx.adapter.export_spec(model, {k: v[:4] for k, v in batch.items()})
            path = out_dir / "denoiser.onnx"
            quantized = [m for m in model.modules() if hasattr(m, "freeze_for_export_")]
            for m in quantized:
                m.freeze_for_export_()  # type: ignore[operator]
            export_denoiser_onnx(spec.module, spec.example_inputs, spec, path, self.config.opset)
            # verify on a different batch size than the traced one (dynamic batch axis)
            check = ctx.adapter.export_spec(model, {k: v[:7] for k, v in batch.items()})
            res = verify_onnx(path, spec.module, check.example_inputs, spec.input_names)
            verification["onnx"] = res
            if quantized and res["sqnr_db"] < self.config.min_int8_sqnr_db:
                raise ExportError(
                    f"{self.name}: int8 ONNX Runtime output has SQNR {res['sqnr_db']:.1f} dB vs torch "
                    f"(< min_int8_sqnr_db {self.config.min_int8_sqnr_db})"
                )
            if not quantized and res["max_abs_error"] > self.config.max_abs_error:
                raise ExportError(
                    f"{self.name}: ONNX Runtime differs from torch by {res['max_abs_error']:.3g} "
                    f"(> max_abs_error {self.config.max_abs_error})"
                )
            artifacts["denoiser_onnx"] = "denoiser.onnx"
        log.info("exported %s: %s", out_dir, verification)
        return ExportResult(artifacts=artifacts, verification=verification)
