"""FP8 (E4M3) linear on sm_89+ GPUs: dynamic activation scaling + the FP8 GEMM.

Math (``Fp8Linear``'s reference path)::

    s_x      = max|x| / 448                 per tensor, or per row (``per_token``),
               or the calibrated input_scale (``static``)
    x_q      = fp8_e4m3(clamp(x / s_x, ±448))
    y        = (x_q @ w_qᵀ) · s_x · s_w[n] + b[n]          fp32 accumulation

The weight is already E4M3 with per-channel (or one repeated per-tensor) scales. The
activation cast runs in torch: its float → E4M3 rounding is the hardware's on the GPU,
while Triton's interpreter rounds that cast wrongly, so tests feed the GEMM torch-made
E4M3 codes. The GEMM is ``compressor.kernels.scaled_gemm`` with fp8 operands, which
builds only from sm_89 (``compressor kernels`` reports it as not applicable below).
The torch reference is ``compressor.kernels.reference.fp8_linear_ref``.
"""

from __future__ import annotations

import torch

from compressor.kernels.reference import check_fp8_linear, quantize_fp8_activation
from compressor.kernels.scaled_gemm import launch_scaled_gemm


@torch.library.triton_op("compressor::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_granularity: str,
    out_dtype: torch.dtype,
    input_scale: torch.Tensor | None,
) -> torch.Tensor:
    from torch.library import wrap_triton

    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
    q, scale = quantize_fp8_activation(x2, act_granularity, input_scale)
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
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``quant(x) @ weightᵀ · scales + bias`` for ``x`` [..., K] by the Triton FP8 GEMM
    (``act_granularity`` ``static``: with the calibrated ``input_scale``)."""
    check_fp8_linear(x, weight, weight_scale)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return torch.ops.compressor.fp8_linear(
        x, weight, weight_scale, bias, act_granularity, out_dtype, input_scale
    )
