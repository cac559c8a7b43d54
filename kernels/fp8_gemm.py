"""FP8 (E4M3) linear on sm_89+ GPUs: dynamic activation scaling + the FP8 GEMM.

Math (``Fp8Linear``'s reference path)::

    s_x      = max|x| / 448                 per tensor, or per row (``per_token``)
    x_q      = fp8_e4m3(clamp(x / s_x, ±448))
    y        = (x_q @ w_qᵀ) · s_x · s_w[n] + b[n]          fp32 accumulation

The weight is already E4M3 with per-channel (or one repeated per-tensor) scales. The
activation cast runs in torch: its float → E4M3 rounding is the hardware's on the GPU,
while Triton's interpreter rounds that cast wrongly, so tests feed the GEMM torch-made
E4M3 codes. The GEMM is ``compressor.kernels.scaled_gemm`` with fp8 operands, which
builds only from sm_89 (``compressor kernels`` reports it as not applicable below).
"""

from __future__ import annotations

import torch

from compressor.kernels.scaled_gemm import launch_scaled_gemm, scaled_gemm_ref

FP8_MAX = 448.0
ACT_GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_token")


def quantize_fp8_activation(x2: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes [M, K] and fp32 scales [M] (a per-tensor scale is repeated per row)."""
    if granularity not in ACT_GRANULARITIES:
        raise ValueError(f"fp8: activation granularity {granularity!r} is not one of per_tensor, per_token")
    xf = x2.float()
    if granularity == "per_tensor":
        scale = (xf.abs().amax() / FP8_MAX).clamp(min=1e-12).expand(x2.shape[0]).contiguous()
    else:
        scale = (xf.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(
            f"fp8: weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8: x has K={x.shape[-1]} features but the weight is [N, K={weight.shape[1]}]")
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(f"fp8: weight_scale has {weight_scale.numel()} entries for N={weight.shape[0]}")


@torch.library.triton_op("compressor::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_granularity: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    from torch.library import wrap_triton

    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    q, scale = quantize_fp8_activation(x2, act_granularity)
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=out_dtype, device=x.device)
    launch_scaled_gemm(q, weight, scale, weight_scale.reshape(-1), bias, "none", out, wrap_triton)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_granularity: str = "per_tensor",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``quant(x) @ weightᵀ · scales + bias`` for ``x`` [..., K] by the Triton FP8 GEMM."""
    _check(x, weight, weight_scale)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return torch.ops.compressor.fp8_linear(x, weight, weight_scale, bias, act_granularity, out_dtype)


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_granularity: str = "per_tensor",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The pure-torch reference of ``fp8_linear``."""
    _check(x, weight, weight_scale)
    x2 = x.reshape(-1, x.shape[-1])
    q, scale = quantize_fp8_activation(x2, act_granularity)
    y = scaled_gemm_ref(q, weight, scale, weight_scale.reshape(-1), bias, "none", out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
