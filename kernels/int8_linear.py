"""Int8Linear: W8A8 linear layer (int8 weights per output channel, int8 activations).

Math. Weights are symmetric per output channel: ``Wq = clamp(round(W / sw), -127, 127)``
with ``sw[n] = max|W[n, :]| / 127``. Activations are quantized on the fly, by one of
two schemes that match what the engines run:

- ``dynamic_per_token``: symmetric, one scale per row, ``sx[m] = max|x[m, :]| / 127``
  (what GPU W8A8 kernels and TensorRT-LLM-style engines run);
- ``dynamic_per_tensor``: ONNX Runtime's ``DynamicQuantizeLinear``: asymmetric uint8,
  ``sx = (max(0, max x) - min(0, min x)) / 255``, ``zp = round(-min(0, min x) / sx)``;
- ``static_per_tensor``: symmetric, ONE scale ``input_scale`` calibrated ahead of time,
  ``sx = amax / 127`` with ``amax`` the largest ``|x|`` (after SmoothQuant's divisor)
  seen on the calibration data; ``Xq = clamp(round(x / sx), -128, 127)``: the range of
  ONNX ``QuantizeLinear`` and TensorRT's int8, so an input past the calibrated range
  saturates exactly as the engine does. What TensorRT runs from explicit Q/DQ (it has no
  dynamic per-token int8): see ``compressor.exporters.onnx.onnx_qdq``.

The output is ``(Xq - zp) @ Wqᵀ * sx * sw + b`` (int32 accumulation). An optional
SmoothQuant vector ``smooth`` divides the input per channel (its inverse is already
multiplied into ``weight``), moving activation outliers into the weights.

Paths. The module keeps a float master ``weight`` so quantization-aware distillation
can train it with a straight-through estimator while ``weight_scale`` stays fixed
(quantizers are frozen, the weights move). The CPU forward is the reference: exact
emulation of the engine's rounding (round half to even, saturation), so fidelity
measured in torch is the fidelity of the exported engine. Under ONNX export the layer
lowers to ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add`` carrying our
int8 weights and scales, which ONNX Runtime fuses into ``DynamicQuantizeMatMul``; the
static scheme lowers to ``QuantizeLinear(s, uint8 zero point 128) → MatMulInteger`` with
the calibrated scale as a constant, and per-token to ``Round → Clip → +128 → Cast(uint8)``:
uint8 codes, because ONNX Runtime's S8S8 kernel is several times slower than U8U8 on AVX2.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.triton_support import HAS_TRITON

ActScheme = Literal["dynamic_per_token", "dynamic_per_tensor", "static_per_tensor"]
ACT_SCHEMES: tuple[str, ...] = ("dynamic_per_token", "dynamic_per_tensor", "static_per_tensor")
_EPS = 1e-8


def weight_scale_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scale per output channel: ``max|W[n]| / 127`` (never zero)."""
    return (weight.detach().abs().amax(dim=1).float() / 127.0).clamp(min=_EPS)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weights ``clamp(round(W / scale), -127, 127)``; ``scale`` is [N]."""
    return torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)


def _ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Forward ``xq``, backward identity (straight-through estimator)."""
    return x + (xq - x).detach()


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale[:, None].to(weight.dtype)
    q = torch.clamp(torch.round(weight / s), -127, 127)
    return _ste(weight, q * s)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    s = (x.detach().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=_EPS)
    q = torch.clamp(torch.round(x / s), -127, 127)
    return _ste(x, q * s)


def static_input_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The static per-tensor activation scale ``amax / 127`` (0-d float32, never zero)."""
    return (torch.as_tensor(amax, dtype=torch.float32).detach().amax() / 127.0).clamp(min=_EPS)


def fake_quant_static_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / s), -128, 127) · s`` with the calibrated scale ``s``; straight-through
    gradient. Inputs beyond the calibrated range saturate at ``-128 s`` / ``127 s``, as
    ``QuantizeLinear`` (and TensorRT) saturate int8."""
    s = scale.to(x.dtype)
    q = torch.clamp(torch.round(x / s), -128, 127)
    return _ste(x, q * s)


def fake_quant_dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """ONNX ``DynamicQuantizeLinear`` then dequantize, with a straight-through gradient."""
    xd = x.detach()
    lo = torch.clamp(xd.min(), max=0.0)
    hi = torch.clamp(xd.max(), min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=_EPS)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return _ste(x, (q - zp) * scale)


class _Int8LinearOnnx(torch.autograd.Function):
    """Carries the int8 lowering through ``torch.onnx.export`` (TorchScript exporter)."""

    @staticmethod
    def forward(ctx, x, qweight_t, w_scale, bias, inv_smooth, per_token, input_scale=None):
        # Only shapes matter while tracing; the real math is Int8Linear.forward.
        return x.new_zeros((*x.shape[:-1], qweight_t.shape[1]))

    @staticmethod
    def symbolic(g, x, qweight_t, w_scale, bias, inv_smooth, per_token, input_scale=None):
        from torch.onnx import TensorProtoDataType as DT

        if not _is_none(g, inv_smooth):
            x = g.op("Mul", x, inv_smooth)
        # Both symmetric schemes feed MatMulInteger uint8 codes q + 128 with zero point 128 (the
        # same integer product): ONNX Runtime's S8S8 kernel is about 3.8x slower than U8U8 on
        # AVX2 (measured 228 vs 60 ms on 4096x384x1536), and uint8 activations let the exporter
        # pick the weight encoding that is exact on this CPU (compressor.exporters.onnx.ort_int8).
        if not _is_none(g, input_scale) or per_token:
            zp = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        if not _is_none(g, input_scale):
            # static: clamp(round(x / s), -128, 127) + 128 is QuantizeLinear's uint8 with zero point
            # 128 (round half to even, saturating), with the calibrated s as a constant
            q = g.op("QuantizeLinear", x, input_scale, zp)
            acc = g.op("MatMulInteger", q, qweight_t, zp)
            y = g.op("Mul", g.op("Cast", acc, to_i=DT.FLOAT), g.op("Mul", input_scale, w_scale))
        elif per_token:
            # s[m] = max(|x[m, :]|) / 127; q = clip(round(x / s), -127, 127) + 128 as uint8
            amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
            s = g.op(
                "Max",
                g.op("Div", amax, g.op("Constant", value_t=torch.tensor(127.0))),
                g.op("Constant", value_t=torch.tensor(_EPS)),
            )
            # round(x / s) + 128, saturated to uint8, is QuantizeLinear(x * (1 / s), 1, 128): one pass
            # over the activation instead of Div, Round, Clip, Add and Cast (the reciprocal is one
            # number per row). x * (1 / s) and x / s can round apart only at exact .5 ties.
            inv = g.op("Reciprocal", s)
            one = g.op("Constant", value_t=torch.tensor(1.0))
            q = g.op("QuantizeLinear", g.op("Mul", x, inv), one, zp)
            acc = g.op("MatMulInteger", q, qweight_t, zp)
            # per-column scale first, the per-row one after: ONNX Runtime fuses
            # Cast -> Mul(Mul(a_scale, b_scale)) into MatMulIntegerToFloat, whose a_scale is one
            # number per tensor, and a per-row s there gives wrong results (min cosine 0.61 on MiniLM)
            y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=DT.FLOAT), w_scale), s)
        else:
            q, s, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
            acc = g.op("MatMulInteger", q, qweight_t, zp)
            y = g.op("Mul", g.op("Cast", acc, to_i=DT.FLOAT), g.op("Mul", s, w_scale))
        if not _is_none(g, bias):
            y = g.op("Add", y, bias)
        return y


def _is_none(g, value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


class Int8Linear(nn.Module):
    """A W8A8 linear layer; see the module docstring for the math and the paths."""

    weight_scale: torch.Tensor
    smooth: torch.Tensor | None
    weight_mask: torch.Tensor | None
    qweight_t: torch.Tensor | None
    inv_smooth: torch.Tensor | None
    input_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        act_scheme: ActScheme = "dynamic_per_token",
    ) -> None:
        super().__init__()
        if act_scheme not in ACT_SCHEMES:
            raise ValueError(f"act_scheme {act_scheme!r} is not one of {', '.join(ACT_SCHEMES)}")
        self.in_features = in_features
        self.out_features = out_features
        self.act_scheme: ActScheme = act_scheme
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("smooth", None)
        self.register_buffer("weight_mask", None)
        # static_per_tensor: the calibrated activation scale (0-d); None for the dynamic schemes
        self.register_buffer("input_scale", torch.ones(()) if act_scheme == "static_per_tensor" else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        act_scheme: ActScheme = "dynamic_per_token",
        smooth: torch.Tensor | None = None,
        input_scale: torch.Tensor | float | None = None,
    ) -> Int8Linear:
        """Quantize ``linear``; ``smooth`` (SmoothQuant) divides the input per channel.

        ``input_scale`` is the calibrated activation scale of ``static_per_tensor`` (the
        scale of the input *after* the division by ``smooth``: see ``static_input_scale``);
        it is required for that scheme and refused for the dynamic ones."""
        if (act_scheme == "static_per_tensor") != (input_scale is not None):
            raise ValueError(
                f"act_scheme {act_scheme!r}: input_scale is "
                + ("required (calibrate it: amax of the input / 127)" if input_scale is None else "not used")
            )
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, act_scheme)
        if input_scale is not None:
            scale = torch.as_tensor(input_scale, dtype=torch.float32).detach().reshape(())
            if not bool(torch.isfinite(scale)) or float(scale) <= 0:
                raise ValueError(f"input_scale must be finite and positive, got {float(scale)}")
            m.input_scale = scale.clone()
        w = linear.weight.detach().float()
        if smooth is not None:
            smooth = smooth.detach().float().clamp(min=_EPS)
            w = w * smooth[None, :]
            m.smooth = smooth
        mask = getattr(linear, "weight_mask", None)
        if mask is not None:
            m.weight_mask = mask.clone()
            w = w * mask
        m.weight.data.copy_(w)
        m.weight_scale.copy_(weight_scale_per_channel(w))
        if linear.bias is not None and m.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m

    def qweight(self) -> torch.Tensor:
        """The int8 weights [N, K] that the engines run."""
        return quantize_weight(self.weight.detach(), self.weight_scale)

    def _inference_qweight(self) -> torch.Tensor:
        """``qweight()`` cached until the master weight or the scales change (in place or not):
        re-quantizing the weight on every call would cost more than the int8 GEMM saves."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight_scale._version)
        cached = getattr(self, "_qweight_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.qweight())
            self._qweight_cache = cached
        return cached[1]

    @torch.no_grad()
    def freeze_for_export_(self) -> None:
        """Store the int8 weights [K, N] and 1/smooth as buffers, so a trace carries them as
        initializers (computed inside the trace they would be float weights plus Round ops)."""
        self.register_buffer("qweight_t", self.qweight().t().contiguous())
        self.register_buffer("inv_smooth", None if self.smooth is None else 1.0 / self.smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            if getattr(self, "qweight_t", None) is None:
                raise RuntimeError("call freeze_for_export_() on Int8Linear before ONNX export")
            return _Int8LinearOnnx.apply(
                x,
                self.qweight_t,
                self.weight_scale,
                self.bias,
                self.inv_smooth,
                self.act_scheme == "dynamic_per_token",
                self.input_scale,
            )
        if x.is_cuda and self.act_scheme == "dynamic_per_token" and not self.training:
            fast = _cuda_w8a8()
            if fast is not None:
                return fast(
                    x, self._inference_qweight(), self.weight_scale, self.bias, self.smooth, "none", x.dtype
                )
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.act_scheme == "dynamic_per_token":
            xq = fake_quant_per_token(x)
        elif self.act_scheme == "static_per_tensor":
            assert self.input_scale is not None
            xq = fake_quant_static_per_tensor(x, self.input_scale)
        else:
            xq = fake_quant_dynamic_uint8(x)
        wq = fake_quant_weight(self.weight, self.weight_scale)
        return F.linear(xq, wq.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def weight_bytes(self) -> int:
        n = self.weight.numel() + 4 * self.weight_scale.numel()
        n += 0 if self.bias is None else 4 * self.bias.numel()
        n += 0 if self.input_scale is None else 4
        return n + (0 if self.smooth is None else 4 * self.smooth.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"act={self.act_scheme}, smooth={self.smooth is not None}"
        )


def _cuda_w8a8():
    """The Triton W8A8 path when Triton is installed, else None (the reference runs)."""
    if not HAS_TRITON:
        return None
    from compressor.kernels.w8a8 import w8a8_linear  # imports triton

    return w8a8_linear
