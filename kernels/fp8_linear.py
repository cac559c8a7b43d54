"""Fp8Linear: FP8 (E4M3) weights and activations, the Hopper tensor-core format.

Math. Weights are E4M3 with a float32 scale per output channel or per tensor,
``W ≈ fp8(W / sw) · sw`` with ``sw = max|W| / 448`` (``compressor.kernels.fp8_format``);
activations are quantized to E4M3 with ``sx = max|x| / 448`` taken on the fly over the
whole tensor (``dynamic_per_tensor``) or over each row (``dynamic_per_token``: a token's
output does not depend on its batch-mates), or with one ``sx`` calibrated on the
calibration data (``static_per_tensor``, ``input_scale``). The product accumulates in
fp32: ``y = (Xq · sx)(Wq · sw)ᵀ + b``. These are the schemes of compressed-tensors'
``float-quantized`` format, which vLLM runs.

Paths. This is the reference path (any device torch can cast float8 on): it runs the
E4M3 rounding exactly through ``torch.float8_e4m3fn`` and trains the float master
weight through a straight-through estimator with the scales fixed, like Int8Linear.
FP8 GEMMs run only on sm_89+ GPUs (target ``h100``): there, at inference and with Triton
installed (``HAS_TRITON``), the layer runs the Triton FP8 GEMM (``compressor.kernels.fp8_gemm``); the TensorRT Q/DQ export is a
separate piece (engines issue).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.fp8_format import FP8_DTYPE, FP8_E4M3_MAX, fp8_scale
from compressor.kernels.triton_support import HAS_TRITON


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 quantize-dequantize with a straight-through gradient."""
    q = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE).to(x.dtype) * scale
    return x + (q - x).detach()


Fp8ActScheme = Literal["dynamic_per_tensor", "dynamic_per_token", "static_per_tensor"]
FP8_ACT_SCHEMES: tuple[str, ...] = ("dynamic_per_tensor", "dynamic_per_token", "static_per_tensor")
_GRANULARITY = {
    "dynamic_per_tensor": "per_tensor",
    "dynamic_per_token": "per_token",
    "static_per_tensor": "static",
}


class Fp8Linear(nn.Module):
    weight_scale: torch.Tensor
    weight_mask: torch.Tensor | None
    input_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        granularity: Literal["per_tensor", "per_channel"] = "per_channel",
        act_scheme: Fp8ActScheme = "dynamic_per_tensor",
    ) -> None:
        super().__init__()
        if act_scheme not in FP8_ACT_SCHEMES:
            raise ValueError(f"fp8: activations {act_scheme!r} is not one of {', '.join(FP8_ACT_SCHEMES)}")
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.act_scheme: str = act_scheme
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.register_buffer("weight_mask", None)
        self.register_buffer("input_scale", None)  # [1], static_per_tensor only

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        granularity: Literal["per_tensor", "per_channel"] = "per_channel",
        act_scheme: Fp8ActScheme = "dynamic_per_tensor",
        input_scale: torch.Tensor | None = None,
    ) -> Fp8Linear:
        """``linear`` in FP8; a ``static_per_tensor`` layer needs its calibrated ``input_scale``
        (``max|x| / 448`` over the calibration data)."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity, act_scheme)
        if act_scheme == "static_per_tensor":
            if input_scale is None or input_scale.numel() != 1 or not bool(input_scale.float() > 0):
                raise ValueError("fp8 static_per_tensor needs one positive calibrated input_scale")
            m.input_scale = input_scale.detach().float().reshape(1).clone()
        w = linear.weight.detach().float()
        mask = getattr(linear, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            m.weight_mask = mask.clone()
            w = w * mask
        m.weight.data.copy_(w)
        m.weight_scale = fp8_scale(w, granularity).reshape(-1, 1).expand(linear.out_features, 1).clone()
        if linear.bias is not None and m.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m

    def fp8_weight(self) -> torch.Tensor:
        """The E4M3 weights [N, K] the GPU runs (scale them by ``weight_scale``)."""
        return (self.weight.detach() / self.weight_scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("Fp8Linear has no ONNX Runtime lowering; FP8 engines are built by TensorRT")
        if (
            HAS_TRITON
            and x.is_cuda
            and not self.training
            and torch.cuda.get_device_capability(x.device) >= (8, 9)
        ):
            from compressor.kernels.fp8_gemm import fp8_linear  # the Triton FP8 GEMM (imports triton)

            return fp8_linear(
                x, self.fp8_weight(), self.weight_scale, self.bias, _GRANULARITY[self.act_scheme], x.dtype,
                self.input_scale,
            )  # fmt: skip
        xq = fake_quant_fp8(x, self.activation_scale(x))
        wq = fake_quant_fp8(self.weight, self.weight_scale.to(self.weight.dtype))
        return F.linear(xq, wq, self.bias)

    def activation_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``sx`` for ``x``: one value (per tensor, static) or ``[..., 1]`` (per token)."""
        if self.act_scheme == "static_per_tensor":
            if self.input_scale is None:
                raise RuntimeError("Fp8Linear static_per_tensor has no calibrated input_scale")
            return self.input_scale.to(x.dtype)
        a = x.detach().abs()
        amax = a.amax(dim=-1, keepdim=True) if self.act_scheme == "dynamic_per_token" else a.amax()
        return (amax / FP8_E4M3_MAX).clamp(min=1e-12)

    def weight_bytes(self) -> int:
        return (
            self.weight.numel()
            + 4 * self.weight_scale.numel()
            + (0 if self.bias is None else 4 * self.bias.numel())
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 {self.granularity}, "
            f"activations {self.act_scheme}"
        )
