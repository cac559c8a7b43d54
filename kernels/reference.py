"""The pure-torch reference of every Triton kernel: what each kernel must match, and what
runs wherever the kernel cannot (the CPU, a machine without Triton).

- ``scaled_gemm_ref``: ``act(a_scale[:, None] · (a @ bᵀ) · b_scale + bias)`` for int8
  (exact integer accumulation) or E4M3 operands (``compressor.kernels.scaled_gemm``).
- ``quantize_per_token_ref`` / ``w8a8_linear_ref``: per-token int8 activations, then the
  int8 GEMM (``compressor.kernels.w8a8``).
- ``quantize_fp8_activation`` / ``fp8_linear_ref``: dynamic E4M3 activations, then the
  FP8 GEMM (``compressor.kernels.fp8_gemm``).
- ``w4a16_gemm_ref``: ``x @ dequant(W)`` over the packed int4 layout of
  ``compressor.kernels.int4_format`` (``compressor.kernels.w4a16``).

The input checks shared by a kernel and its reference live here too, so both refuse the
same inputs with the same message.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.kernels.fp8_format import FP8_E4M3_MAX
from compressor.kernels.int4_format import dequantize_w4a16

ACTIVATIONS: dict[str, int] = {"none": 0, "gelu": 1, "silu": 2}
ACT_GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_token", "static")
_EPS = 1e-8


# --------------------------------------------------------------------------- scaled GEMM


def scaled_gemm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The torch reference: exact integer accumulation for int8, fp32 for fp8."""
    if a.dtype == torch.int8:
        # float64 holds every int8·int8 sum below 2^53 exactly: an integer GEMM on any device
        acc = (a.double() @ b.double().t()).float()
    else:
        acc = a.float() @ b.float().t()
    y = acc * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    if act == "gelu":
        y = F.gelu(y)
    elif act == "silu":
        y = F.silu(y)
    return y.to(out_dtype)


# --------------------------------------------------------------------------- W8A8


def quantize_per_token_ref(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and fp32 scales [M] of ``x / smooth`` (computed in fp32)."""
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    scale = (xf.abs().amax(dim=-1) / 127.0).clamp(min=_EPS)
    q = torch.clamp(torch.round(xf / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def check_w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, act: str) -> None:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"w8a8: qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"w8a8: x has K={x.shape[-1]} features but qweight is [N, K={qweight.shape[1]}]")
    if weight_scale.numel() != qweight.shape[0]:
        raise ValueError(f"w8a8: weight_scale has {weight_scale.numel()} entries for N={qweight.shape[0]}")
    if act not in ACTIVATIONS:
        raise ValueError(f"w8a8: act {act!r} is not one of {', '.join(ACTIVATIONS)}")


def w8a8_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act: str = "none",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The pure-torch reference of ``w8a8_linear`` (exact integer GEMM)."""
    check_w8a8_linear(x, qweight, weight_scale, act)
    x2 = x.reshape(-1, x.shape[-1])
    q, scale = quantize_per_token_ref(x2, smooth)
    y = scaled_gemm_ref(q, qweight, scale, weight_scale.reshape(-1), bias, act, out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


# --------------------------------------------------------------------------- FP8


def quantize_fp8_activation(
    x2: torch.Tensor, granularity: str, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes [M, K] and fp32 scales [M] (a per-tensor scale is repeated per row);
    ``static``: the calibrated ``input_scale`` (one value) for every row."""
    if granularity not in ACT_GRANULARITIES:
        raise ValueError(
            f"fp8: activation granularity {granularity!r} is not one of {', '.join(ACT_GRANULARITIES)}"
        )
    xf = x2.float()
    if granularity == "static":
        if input_scale is None or input_scale.numel() != 1:
            raise ValueError("fp8: static activations need the one calibrated input_scale")
        scale = input_scale.float().reshape(()).expand(x2.shape[0]).contiguous()
    elif granularity == "per_tensor":
        scale = (xf.abs().amax() / FP8_E4M3_MAX).clamp(min=1e-12).expand(x2.shape[0]).contiguous()
    else:
        scale = (xf.abs().amax(dim=1) / FP8_E4M3_MAX).clamp(min=1e-12)
    q = (xf / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def check_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(
            f"fp8: weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8: x has K={x.shape[-1]} features but the weight is [N, K={weight.shape[1]}]")
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(f"fp8: weight_scale has {weight_scale.numel()} entries for N={weight.shape[0]}")


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_granularity: str = "per_tensor",
    out_dtype: torch.dtype | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pure-torch reference of ``fp8_linear``."""
    check_fp8_linear(x, weight, weight_scale)
    x2 = x.reshape(-1, x.shape[-1])
    q, scale = quantize_fp8_activation(x2, act_granularity, input_scale)
    y = scaled_gemm_ref(q, weight, scale, weight_scale.reshape(-1), bias, "none", out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------- W4A16


def w4a16_gemm_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the kernel computes: ``x [M, K] @ dequant(W) [K, N] (+ bias)`` in x's dtype.

    Like the kernel, the dequantized weight is rounded to x's dtype before the product
    and the product accumulates in fp32.
    """
    w = dequantize_w4a16(packed, scales, zeros, group_size).to(x.dtype)  # (K, N)
    y = x.to(torch.float32) @ w.to(torch.float32)  # (M, N)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
