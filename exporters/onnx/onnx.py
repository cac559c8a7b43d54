"""`onnx` exporter, ONNX Runtime flavour.

The model is traced through the adapter's export graph (for BERT encoders:
ORT's fused ``MultiHeadAttention``); every ``Int8Linear`` lowers to
``DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add`` carrying the weights and
scales our passes chose (no re-quantization by ``onnxruntime.quantization``), which
ONNX Runtime fuses into ``DynamicQuantizeMatMul``. Where this machine's ONNX Runtime
saturates uint8 × int8 products (x86 without VNNI), the weights are stored as uint8
with zero point 128 instead (``int8_weights``; see ``ort_int8``).

Verification is part of the export: the ONNX model runs in ONNX Runtime on held-out
inputs of several batch sizes and lengths and is compared with the torch model;
past tolerance the export fails and no bundle is written. The torch reference is
computed *before* tracing, on the original module, and the trace runs on a copy:
tracing a transformers 5 BERT has been seen to change what the traced module
computes afterwards.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.config import option
from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.exporters.onnx.ort_fusions import fuse_column_scales_
from compressor.exporters.onnx.ort_int8 import INT8_WEIGHT_CHOICES, encode_int8_weights_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxExportConfig:
    opset: int = option(17, help="ONNX opset (LayerNormalization needs 17)")
    file: str = option("model.onnx", help="file name inside the bundle")
    verify_batch_sizes: tuple[int, ...] = option((1, 3, 8), help="batch sizes checked in ONNX Runtime")
    verify_lengths: tuple[int, ...] = option((16, 48, 128), help="sequence lengths checked in ONNX Runtime")
    min_cosine: float = option(
        0.999, help="fail when any ONNX Runtime output's cosine vs torch is below this"
    )
    int8_weights: str = option(
        "auto",
        help="MatMulInteger weight encoding: int8 (fastest with VNNI), uint8 (exact on any x86 CPU), "
        "auto (int8 where this machine's ONNX Runtime computes U8S8 exactly, else uint8)",
    )

    def validate(self, path: str) -> None:
        if self.opset < 17:
            raise RecipeError(f"{path}.opset: {self.opset} is too old; 17 or later is needed")
        if not 0 < self.min_cosine <= 1:
            raise RecipeError(f"{path}.min_cosine: {self.min_cosine} is not in (0, 1]")
        if self.int8_weights not in INT8_WEIGHT_CHOICES:
            raise RecipeError(
                f"{path}.int8_weights: {self.int8_weights!r} is not one of {', '.join(INT8_WEIGHT_CHOICES)}"
            )
        if "/" in self.file or not self.file.endswith(".onnx"):
            raise RecipeError(f"{path}.file: {self.file!r} must be a plain file name ending in .onnx")


def trace_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], spec, path: Path, opset: int) -> None:
    """``torch.onnx.export`` with the TorchScript exporter under ``spec``'s names and dynamic
    axes (the exporters' one tracing call; the tracer's warnings are noise here)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )


def export_onnx(
    module: nn.Module, spec, path: Path, opset: int, int8_weights: str = "auto"
) -> dict[str, object]:
    """Trace ``spec.module`` (a copy is traced) to ``path`` with the TorchScript exporter.

    Returns how int8 GEMM weights were encoded (see ``compressor.exporters.onnx.ort_int8``).
    """
    traced = copy.deepcopy(spec.module).eval()
    for m in traced.modules():
        freeze = getattr(m, "freeze_for_export_", None)
        if callable(freeze):
            freeze()
    trace_onnx(traced, spec.example_inputs, spec, path, opset)
    import onnx

    proto = onnx.load(str(path))
    merged = dedupe_initializers_(proto)
    encoding = encode_int8_weights_(proto, int8_weights)
    encoding["column_scales_fused"] = fuse_column_scales_(proto)
    if merged or encoding["uint8_rewritten"] or encoding["column_scales_fused"]:
        onnx.save(proto, str(path))
    return encoding


def rename_node_inputs_(model: Any, rename: dict[str, str]) -> None:
    """Make every node that reads a tensor named in ``rename`` read its replacement instead."""
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def dedupe_initializers_(model) -> int:
    """Point every use of a byte-identical initializer at one copy; returns how many were merged.

    Layers that read the same activation with the same SmoothQuant divisor (query, key,
    value) then share one ``Mul`` input, so ONNX Runtime's common-subexpression pass merges
    their ``Mul`` and ``DynamicQuantizeLinear`` into one.
    """
    import hashlib

    from onnx import numpy_helper

    keep: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for init in model.graph.initializer:
        data = numpy_helper.to_array(init).tobytes()
        key = (init.data_type, tuple(init.dims), hashlib.sha256(data).digest())
        if key in keep:
            rename[init.name] = keep[key]
        else:
            keep[key] = init.name
    if not rename:
        return 0
    rename_node_inputs_(model, rename)
    kept = [t for t in model.graph.initializer if t.name not in rename]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(rename)


def ort_session(path: Path, threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session. ``spinning`` False makes its worker threads sleep between
    runs: where several sessions are timed in turns, the one just run would otherwise spin on
    the cores the next one is timed on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def verify_onnx(
    path: Path, model: nn.Module, ctx: ExportContext, batch_sizes: tuple[int, ...], lengths: tuple[int, ...]
) -> dict[str, Any]:
    """Worst-case agreement of ONNX Runtime with the torch model over the held-out grid; the
    held-out data's longest inputs (the serving length) are checked too when they run past
    ``lengths``."""
    first = [next(iter(b.values())) for b in ctx.data.eval]
    source = ctx.data.eval[max(range(len(first)), key=lambda i: first[i].numel())]
    longest = max((int(t.shape[-1]) for t in first if t.dim() > 1), default=0)
    if lengths and longest > max(lengths):
        source = ctx.data.eval[
            max(range(len(first)), key=lambda i: (int(first[i].shape[-1]), first[i].numel()))
        ]
        lengths = (*lengths, longest)
    cases = ctx.adapter.verification_cases(source, batch_sizes, lengths)
    sess = ort_session(path)
    names = {i.name for i in sess.get_inputs()}
    with torch.no_grad():
        model.eval()
        if all(names <= set(c) for c in cases):  # the batches are the graph's inputs (token models)
            feeds = [{k: v.numpy() for k, v in c.items() if k in names} for c in cases]
            refs = [ctx.adapter.forward(model, c).float().numpy() for c in cases]
        else:  # the graph's inputs are made from a batch (a denoiser's noisy sample and timestep)
            specs = [ctx.adapter.export_spec(model, c) for c in cases]
            feeds = [
                {n: t.numpy() for n, t in zip(sp.input_names, sp.example_inputs, strict=True)} for sp in specs
            ]
            refs = [sp.module(*sp.example_inputs).float().numpy() for sp in specs]
    worst_cos, worst_abs = 1.0, 0.0
    for feed, ref in zip(feeds, refs, strict=True):
        out = sess.run(None, feed)[0]
        if out.shape != ref.shape:
            raise ExportError(f"{path.name}: ONNX output shape {out.shape} != torch {ref.shape}")
        if not np.isfinite(out).all():
            raise ExportError(f"{path.name}: ONNX Runtime produced NaN/inf")
        cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
        worst_cos = min(worst_cos, float(cos.min()))
        worst_abs = max(worst_abs, float(np.abs(out - ref).max()))
    return {"cases": len(cases), "min_cosine": worst_cos, "max_abs_error": worst_abs}


@register_exporter
class OnnxExporter(Exporter):
    name = "onnx"
    description = (
        "ONNX for ONNX Runtime (int8 layers as DynamicQuantizeLinear + MatMulInteger), verified in ORT"
    )
    Config = OnnxExportConfig
    forms = frozenset({"int8", "int4"})  # ONNX Runtime has no FP8 GEMM on the engines it serves

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        cfg = self.config
        fp8 = [n for n, m in model.named_modules() if type(m).__name__ == "Fp8Linear"]
        if fp8:
            raise ExportError(
                f"onnx (ONNX Runtime flavour) cannot run FP8 layers ({fp8[0]}, ...): ONNX Runtime has no "
                "FP8 GEMM on this engine; FP8 bundles need a TensorRT engine export"
            )
        path = out_dir / cfg.file
        example = ctx.adapter.verification_cases(ctx.data.eval[0], (2,), (16,))[0]
        spec = ctx.adapter.export_spec(model, example)
        log.info("exporting %s", path)
        encoding = export_onnx(model, spec, path, cfg.opset, cfg.int8_weights)
        report = verify_onnx(path, model, ctx, cfg.verify_batch_sizes, cfg.verify_lengths)
        report.update(encoding)
        if report["min_cosine"] < cfg.min_cosine:
            raise ExportError(
                f"{cfg.file}: ONNX Runtime disagrees with torch: min cosine {report['min_cosine']:.5f} "
                f"< {cfg.min_cosine} over {report['cases']} held-out cases; the bundle was not written"
            )
        return ExportResult(artifacts={"onnx": cfg.file}, verification={"onnx": report})
