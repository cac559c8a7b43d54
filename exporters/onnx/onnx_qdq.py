"""`onnx_qdq` exporter: ONNX with explicit Q/DQ, the TensorRT flavour.

TensorRT builds int8 engines from *explicit* quantization: every quantized GEMM reads
``DequantizeLinear`` outputs, and the builder fuses ``Q → DQ → MatMul ← DQ ← int8
weights`` into one int8 GEMM with our scales (no implicit calibration; what a
``--stronglyTyped`` build needs). Each ``Int8Linear`` lowers to::

    x ─(Mul 1/smooth)─► QuantizeLinear(s_x, int8 zp 0) ─► DequantizeLinear ─┐
    W int8 [N, K] ─► DequantizeLinear(s_w [N], axis 0) ─► Transpose ─► MatMul ─► Add(bias)

the layout TensorRT's own QAT exports produce for ``nn.Linear`` (per output channel
on axis 0 of the ``[out, in]`` weight). SmoothQuant's divisor, when it is not folded
into a norm, is the ``Mul`` before the ``Q``. 2:4-masked weights stay dense int8 with
their zeros in place: TensorRT finds the pattern when the build enables sparsity.

Only ``static_per_tensor`` layers can be exported: TensorRT has no dynamic per-token
(or dynamic per-tensor) int8 activation quantization, so a model quantized with a
dynamic scheme is refused with what to change (``activations: static_per_tensor``).

Rounding. ONNX's ``QuantizeLinear`` rounds half to even and saturates to
``[-128, 127]``, exactly what our torch emulation of ``static_per_tensor`` computes.

Attention is exported through the model's own forward (``export_spec(fused=False)``),
as standard ONNX ops that TensorRT parses; the ONNX Runtime flavour's fused
``com.microsoft.MultiHeadAttention`` is a contrib op TensorRT does not know.

FP8 is not exported: ONNX Runtime on this CPU *can* run float8e4m3fn Q/DQ (opset 19,
checked), but ``Fp8Linear`` quantizes activations with a dynamic per-tensor scale and
TensorRT's Q/DQ scales are build-time constants; an FP8 layer is refused until a
static FP8 activation scheme exists.

``float_dtype: fp16`` (opset 19) rewrites the traced graph's float parts to fp16
(``compressor.exporters.onnx.fp16``): a strongly typed engine then runs attention,
norms and GELU in fp16 around the int8 GEMMs instead of fp32.

Verification is part of the export, like the ONNX Runtime flavour: the Q/DQ model
runs in ONNX Runtime (CPU) on held-out inputs of several shapes and is compared with
the torch model; past tolerance the export fails and no bundle is written. The
agreement two engines can reach is bounded by the model's own quantization noise: one
rounding flip changes a value by a whole step, and the next layers turn it into many
flips. Measured on all-MiniLM-L6-v2 with static per-tensor int8 (no SmoothQuant, 128
calibration texts): torch int8 vs fp32 mean cosine 0.9834, the Q/DQ ONNX in ONNX Runtime
vs fp32 0.9836 (the same fidelity), yet ONNX Runtime vs torch per sentence min cosine
0.985-0.994, and ONNX Runtime with and without its graph optimizations 0.991 against
each other; the fp32 graph of the same export is exact (max abs error 1.7e-7). So a
model this lossy fails the default ``min_cosine: 0.999``: improve the quantization
(``max_float_layers``, quantization-aware ``distill``) or lower ``min_cosine`` knowingly.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.config import option
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.exporters.onnx.onnx import dedupe_initializers_, rename_node_inputs_, trace_onnx, verify_onnx
from compressor.kernels.int8_linear import Int8Linear
from compressor.modules import set_module
from compressor.planning import PlanState

log = logging.getLogger(__name__)

QDQ_FILE = "model.qdq.onnx"


@dataclass(frozen=True)
class OnnxQdqExportConfig:
    opset: int = option(17, help="ONNX opset (per-axis DequantizeLinear needs 13, LayerNormalization 17)")
    file: str = option(QDQ_FILE, help="file name inside the bundle")
    verify_batch_sizes: tuple[int, ...] = option((1, 3, 8), help="batch sizes checked in ONNX Runtime")
    verify_lengths: tuple[int, ...] = option((16, 48, 128), help="sequence lengths checked in ONNX Runtime")
    min_cosine: float = option(
        0.999, help="fail when any ONNX Runtime output's cosine vs torch is below this"
    )
    float_dtype: Literal["fp32", "fp16"] = option(
        "fp32",
        help="type of the graph's float parts (attention, norms, Q/DQ scales): fp16 for strongly typed "
        "TensorRT builds that should run them in fp16 (needs opset 19); outputs stay fp32",
    )

    def validate(self, path: str) -> None:
        if self.opset < 17:
            raise RecipeError(f"{path}.opset: {self.opset} is too old; 17 or later is needed")
        if self.float_dtype == "fp16" and self.opset < 19:
            raise RecipeError(
                f"{path}.float_dtype: fp16 needs opset: 19 or later (QuantizeLinear / DequantizeLinear take "
                f"fp16 scales from opset 19); got opset {self.opset}"
            )
        if not 0 < self.min_cosine <= 1:
            raise RecipeError(f"{path}.min_cosine: {self.min_cosine} is not in (0, 1]")
        if "/" in self.file or not self.file.endswith(".onnx"):
            raise RecipeError(f"{path}.file: {self.file!r} must be a plain file name ending in .onnx")
        if not self.verify_batch_sizes or not self.verify_lengths:
            raise RecipeError(f"{path}: verify_batch_sizes and verify_lengths must not be empty")


class _Int8LinearQdqOnnx(torch.autograd.Function):
    """Carries the explicit Q/DQ lowering through ``torch.onnx.export`` (TorchScript exporter)."""

    @staticmethod
    def forward(ctx, x, qweight, w_scale, bias, inv_smooth, x_scale):
        # Only shapes matter while tracing; QdqInt8Linear.forward holds the math.
        return x.new_zeros((*x.shape[:-1], qweight.shape[0]))

    @staticmethod
    def symbolic(g, x, qweight, w_scale, bias, inv_smooth, x_scale):
        if not _is_none(inv_smooth):
            x = g.op("Mul", x, inv_smooth)
        zp = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))  # int8 Q output, symmetric
        xq = g.op("QuantizeLinear", x, x_scale, zp)
        xdq = g.op("DequantizeLinear", xq, x_scale, zp)
        wdq = g.op("DequantizeLinear", qweight, w_scale, axis_i=0)  # [N, K], one scale per row
        y = g.op("MatMul", xdq, g.op("Transpose", wdq, perm_i=[1, 0]))  # [.., K] @ [K, N]
        if not _is_none(bias):
            y = g.op("Add", y, bias)
        return y


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


class QdqInt8Linear(nn.Module):
    """An ``Int8Linear`` (static per-tensor activations) frozen for the Q/DQ export.

    Holds what the ONNX carries: int8 weights [N, K], per-channel scales [N], the
    activation scale, 1/smooth and the bias. Outside export, ``forward`` computes what
    the Q/DQ graph computes (ONNX ``QuantizeLinear`` range ``[-128, 127]``)."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    inv_smooth: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        if layer.act_scheme != "static_per_tensor" or layer.input_scale is None:
            raise ExportError(f"QdqInt8Linear needs a static_per_tensor Int8Linear, got {layer.act_scheme}")
        with torch.no_grad():
            self.register_buffer("qweight", layer.qweight().contiguous())
            self.register_buffer("weight_scale", layer.weight_scale.detach().float().clone())
            self.register_buffer("input_scale", layer.input_scale.detach().float().reshape(()).clone())
            inv = None if layer.smooth is None else (1.0 / layer.smooth.detach().float())
            self.register_buffer("inv_smooth", inv)
            bias = None if layer.bias is None else layer.bias.detach().float().clone()
            self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _Int8LinearQdqOnnx.apply(
                x, self.qweight, self.weight_scale, self.bias, self.inv_smooth, self.input_scale
            )
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        s = self.input_scale
        xdq = torch.clamp(torch.round(x / s), -128, 127) * s
        w = self.qweight.float() * self.weight_scale[:, None]
        return F.linear(xdq, w, self.bias)


def check_qdq_exportable(model: nn.Module) -> list[str]:
    """Names of the Int8Linear layers to lower; raise ExportError for what TensorRT cannot run."""
    names = []
    for n, m in model.named_modules():
        if type(m).__name__ == "Fp8Linear":
            raise ExportError(
                f"onnx_qdq: {n} is an FP8 layer; FP8 Q/DQ is not exported: Fp8Linear quantizes "
                "activations with a dynamic scale and TensorRT's Q/DQ scales are build-time constants "
                "(quantize with method: int8, activations: static_per_tensor for a TensorRT engine)"
            )
        if isinstance(m, Int8Linear):
            if m.act_scheme != "static_per_tensor":
                raise ExportError(
                    f"onnx_qdq: {n} quantizes activations with {m.act_scheme}, which TensorRT cannot run "
                    "(it has no dynamic int8 activation quantization); set `activations: static_per_tensor` "
                    "in the quantize pass"
                )
            names.append(n)
    return names


def export_onnx_qdq(spec: Any, path: Path, opset: int, fp16: bool = False) -> dict[str, Any]:
    """Trace a copy of ``spec.module`` with every Int8Linear lowered to explicit Q/DQ; write ``path``
    (with the float parts in fp16 when ``fp16``: ``compressor.exporters.onnx.fp16``)."""
    traced = copy.deepcopy(spec.module).eval()
    lowered = 0
    for n, m in list(traced.named_modules()):
        if isinstance(m, Int8Linear):
            set_module(traced, n, QdqInt8Linear(m))
            lowered += 1
    trace_onnx(traced, spec.example_inputs, spec, path, opset)
    import onnx

    proto = onnx.load(str(path))
    identities = bypass_initializer_identities_(proto)
    merged = dedupe_initializers_(proto)  # q/k/v share one activation scale and 1/smooth
    info: dict[str, Any] = {
        "qdq_layers": lowered,
        "initializers_merged": merged,
        "identities_bypassed": identities,
    }
    if fp16:
        from compressor.exporters.onnx.fp16 import float_to_fp16_

        info["fp16"] = float_to_fp16_(proto)
    if merged or identities or fp16:
        onnx.save(proto, str(path))
    return info


def bypass_initializer_identities_(model: Any) -> int:
    """Read initializers directly where the tracer put an ``Identity`` in front of them.

    The TorchScript exporter shares equal buffers (q/k/v's activation scale) through
    ``Identity`` nodes; TensorRT wants Q/DQ scales and weights that are plainly
    constants, so every use of such an ``Identity`` reads its initializer instead."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    rename = {
        n.output[0]: n.input[0]
        for n in model.graph.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    }
    if not rename:
        return 0
    rename_node_inputs_(model, rename)
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in rename)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


@register_exporter
class OnnxQdqExporter(Exporter):
    name = "onnx_qdq"
    description = (
        "ONNX with explicit Q/DQ for TensorRT (static int8 activations, per-channel int8 weights), "
        "verified in ONNX Runtime"
    )
    Config = OnnxQdqExportConfig
    forms = frozenset({"int8", "int4"})

    def check_plan(self, state: PlanState) -> None:
        for n, lin in state.linears.items():
            scheme = lin.facts.get("activations")
            if lin.form == "int8" and scheme != "static_per_tensor":
                raise PlanError(
                    f"{state.where}: {n} (from {lin.by}) quantizes activations with {scheme}, which TensorRT "
                    "cannot run (it has no dynamic int8 activation quantization); set "
                    "`activations: static_per_tensor` in the quantize pass"
                )

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        cfg = self.config
        layers = check_qdq_exportable(model)
        path = out_dir / cfg.file
        example = ctx.adapter.verification_cases(ctx.data.eval[0], (2,), (16,))[0]
        spec = ctx.adapter.export_spec(model, example, fused=False)  # standard ops only: TensorRT parses them
        log.info("exporting %s (%d Q/DQ int8 layers)", path, len(layers))
        try:
            info = export_onnx_qdq(spec, path, cfg.opset, fp16=cfg.float_dtype == "fp16")
            report = verify_onnx(path, model, ctx, cfg.verify_batch_sizes, cfg.verify_lengths)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        report.update(info)
        if report["min_cosine"] < cfg.min_cosine:
            path.unlink(missing_ok=True)
            raise ExportError(
                f"{cfg.file}: ONNX Runtime disagrees with torch on the Q/DQ model: min cosine "
                f"{report['min_cosine']:.5f} < {cfg.min_cosine} over {report['cases']} held-out cases; "
                "the bundle was not written"
            )
        return ExportResult(artifacts={"onnx_qdq": cfg.file}, verification={"onnx_qdq": report})
