"""W8A8 linear on the GPU: fused per-token activation quantization + the int8 GEMM.

Math (the same as ``Int8Linear``'s reference path, which is what the engines run)::

    x̂        = x / smooth                                 SmoothQuant divisor, optional
    s_x[m]   = max(max_k |x̂[m, k]| / 127, 1e-8)
    x_q[m,k] = clamp(round_half_even(x̂[m, k] / s_x[m]), -127, 127)        int8
    y        = act((x_q @ w_qᵀ) · s_x[m] · s_w[n] + b[n])                 int32 accumulation

The quantization kernel reads each row once for its absolute maximum and once more to
quantize, folding the SmoothQuant divisor into both reads (no ``x / smooth`` tensor
is materialised); the GEMM is ``compressor.kernels.scaled_gemm`` with the scales, bias
and activation in its epilogue.

Dispatch. ``w8a8_linear`` is a ``torch.library.triton_op`` (``compressor::w8a8_linear``)
so ``torch.compile`` and ``torch.export`` see one opaque op whose Triton kernels they
can trace through. ``Int8Linear`` calls it on CUDA at inference; on the CPU (and on
request) the pure-torch reference ``compressor.kernels.reference.w8a8_linear_ref`` runs. Tests run the Triton path
on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from compressor.kernels.reference import check_w8a8_linear
from compressor.kernels.scaled_gemm import launch_scaled_gemm
from compressor.kernels.spec import KernelSpec


@triton.jit
def _round_half_even(v):
    # rint without libdevice (the interpreter has none): floor(v + 0.5), then pull exact
    # .5 ties that landed on an odd integer back down by one
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr,
    smooth_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: |x / smooth| maximum of the row
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v / tl.load(smooth_ptr + offs, mask=offs < K, other=1.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / 127.0, 1e-8)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):  # pass 2: quantize with the row's scale
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            v = v / tl.load(smooth_ptr + offs, mask=offs < K, other=1.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(v / scale), -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)


def _launch_quantize(
    x2: torch.Tensor,
    smooth: torch.Tensor | None,
    q: torch.Tensor,
    scale: torch.Tensor,
    launcher: Any = None,
) -> None:
    m, k = x2.shape
    if smooth is not None and smooth.shape != (k,):
        raise ValueError(f"w8a8: smooth must be [K={k}], got {tuple(smooth.shape)}")
    kernel = _quantize_per_token_kernel if launcher is None else launcher(_quantize_per_token_kernel)
    kernel[(m,)](
        x2,
        q if smooth is None else smooth.contiguous(),  # any pointer when HAS_SMOOTH is off
        q,
        scale,
        k,
        x2.stride(0),
        q.stride(0),
        HAS_SMOOTH=smooth is not None,
        BLOCK_K=min(1024, triton.next_power_of_2(k)),
    )


def quantize_per_token(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: int8 codes [M, K] and fp32 scales [M] of ``x / smooth`` for 2-D ``x``."""
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token: x must be 2-D [M, K], got {tuple(x.shape)}")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _launch_quantize(x, smooth, q, scale)
    return q, scale


@torch.library.triton_op("compressor::w8a8_linear", mutates_args=())
def _w8a8_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    act: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    from torch.library import wrap_triton

    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [..., K] -> [M, K]
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    _launch_quantize(x2, smooth, q, scale, wrap_triton)
    out = torch.empty((m, qweight.shape[0]), dtype=out_dtype, device=x.device)
    launch_scaled_gemm(q, qweight, scale, weight_scale.reshape(-1), bias, act, out, wrap_triton)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    act: str = "none",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``act(quant(x / smooth) @ qweightᵀ · scales + bias)`` for ``x`` [..., K] by the Triton
    kernels; the output dtype defaults to ``x``'s."""
    check_w8a8_linear(x, qweight, weight_scale, act)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return torch.ops.compressor.w8a8_linear(x, qweight, weight_scale, bias, smooth, act, out_dtype)


def arch_specs() -> list[KernelSpec]:
    """The activation quantization kernel (no GEMM: no tensor-core instruction expected)."""
    return [
        KernelSpec(
            name="quantize_per_token_smooth",
            fn=_quantize_per_token_kernel,
            signature={
                "x_ptr": "*fp16",
                "smooth_ptr": "*fp32",
                "q_ptr": "*i8",
                "scale_ptr": "*fp32",
                "K": "i32",
                "stride_xm": "i32",
                "stride_qm": "i32",
                "HAS_SMOOTH": "constexpr",
                "BLOCK_K": "constexpr",
            },
            constexprs={"HAS_SMOOTH": True, "BLOCK_K": 1024},
            tensor_core=None,
            num_warps=4,
            num_stages=1,
        )
    ]
