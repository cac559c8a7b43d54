"""FP8 (E4M3) weight quantization with amax scaling, per tensor or per output channel.

Pure torch, no Triton: the quantize pass, ``Fp8Linear`` and the FP8 GEMM's reference read
the format from here.

Micikevicius et al., "FP8 Formats for Deep Learning" (2022): E4M3 has 4 exponent and
3 mantissa bits, max finite value 448, no infinities. A weight is stored as
``fp8(W / scale)`` with ``scale = amax / 448`` so its largest magnitude lands on the
largest finite E4M3 value; it dequantizes as ``fp8.float() * scale``.

Round trip bound (used by the tests): for ``|W/scale|`` in the normal range
(``>= 2^-6``) the relative error is at most ``2^-4`` (half an ulp of a 3-bit
mantissa); below it (subnormals, spacing ``2^-9``) the absolute error is at most
``2^-10 · scale``. So ``|W - deq| <= max(|W| · 2^-4, 2^-10 · scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fp8Weight:
    data: torch.Tensor  # (out, in) torch.float8_e4m3fn
    scale: torch.Tensor  # () per tensor or (out, 1) per channel, float32
    granularity: Literal["per_tensor", "per_channel"]

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.data, self.scale)


def fp8_scale(weight: torch.Tensor, granularity: Literal["per_tensor", "per_channel"]) -> torch.Tensor:
    """``amax / 448``; an all-zero tensor or row gets scale 1 so scales are always finite."""
    w = weight.detach().float()
    if granularity == "per_tensor":
        amax = w.abs().amax()
    elif granularity == "per_channel":
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
    else:
        raise ValueError(f"granularity={granularity!r} is not one of per_tensor, per_channel")
    if not torch.isfinite(amax).all():
        raise ValueError("weight has non-finite values; cannot quantize to fp8")
    scale = amax / FP8_E4M3_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(
    weight: torch.Tensor, granularity: Literal["per_tensor", "per_channel"] = "per_channel"
) -> Fp8Weight:
    """E4M3 weight with amax scaling (round to nearest even, saturating at ±448)."""
    scale = fp8_scale(weight, granularity)
    scaled = (weight.detach().float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return Fp8Weight(scaled.to(FP8_DTYPE), scale, granularity)


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.to(torch.float32) * scale


def fp8_error_bound(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on ``|W - dequantize(quantize(W))|`` (see the module docstring)."""
    w = weight.detach().float().abs()
    return torch.maximum(w * 2.0**-4, 2.0**-10 * scale.expand_as(w))
