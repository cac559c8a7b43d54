"""Scaled low-precision GEMM with a fused epilogue: int8 (W8A8) and FP8 (E4M3) operands.

Math. ``a`` [M, K] and ``b`` [N, K] hold quantized codes (int8, or float8_e4m3fn);
``a_scale`` [M] and ``b_scale`` [N] their dequantization scales (a per-tensor scale is
the same number repeated). The kernel computes

    acc[m, n] = Σ_k a[m, k] · b[n, k]            int32 for int8 (exact), fp32 for fp8
    y[m, n]   = act(acc · a_scale[m] · b_scale[n] + bias[n])

with ``act`` one of none / GELU (erf form, as ``F.gelu``) / SiLU, stored in the output
dtype (fp16, bf16 or fp32). Fusing scales, bias and activation into the GEMM's epilogue
is what makes W8A8 pay off: the int32 accumulator never goes to memory.

Layout. ``a`` is row-major [M, K] (activations, one row per token); ``b`` is the
``nn.Linear`` weight layout [N, K], read as the [K, N] operand through its strides,
so no transposed copy is made. Tiles are BLOCK_M × BLOCK_N, walked in GROUP_M-row
super-groups so neighbouring programs share ``b`` tiles in L2 (Triton tutorial 03).

The torch reference is ``compressor.kernels.reference.scaled_gemm_ref``.

Tensor cores: int8 ``tl.dot`` with an int32 accumulator lowers to ``mma.sync ...
s8.s8.s32`` on sm_80 / sm_87 and ``wgmma`` on sm_90; fp8 operands need sm_89+.
``compressor kernels`` builds every specialisation per architecture and checks this.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from compressor.kernels.reference import ACTIVATIONS
from compressor.kernels.spec import KernelSpec

OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row, column) of output tile ``pid`` in grouped order: GROUP_M rows of tiles at a time
    share their b tiles while they are hot in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _scaled_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]
    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if INT8:
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0)
            acc += tl.dot(a, b, out_dtype=tl.int32)
        else:
            # fp8: K is a multiple of BLOCK_K (the launcher checks), so no K padding is
            # needed; rows / columns past M / N only reach outputs the store masks off
            a = tl.load(a_ptrs, mask=offs_m[:, None] < M)
            b = tl.load(b_ptrs, mask=offs_n[None, :] < N)
            acc += tl.dot(a, b, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # epilogue: scales, bias, activation, cast; the accumulator never leaves registers
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        y += bias.to(tl.float32)[None, :]
    if ACT == 1:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:
        y = y / (1.0 + tl.exp(-y))
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemm_config(m: int, n: int, k: int, int8: bool) -> dict[str, int]:
    """Tile sizes by problem shape (tensor-core minimums: 16 rows, K step 32 for 8-bit).

    Small M (decode, small batches) takes narrow row tiles so the grid still fills the
    SMs; large M takes 128 × 128 tiles with a deep K step. Under the interpreter the
    smallest legal tiles keep CPU tests fast.
    """
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    block_k = 128 if int8 else (64 if k % 64 == 0 else 32)
    if m <= 16:
        return {
            "BLOCK_M": 16,
            "BLOCK_N": 64,
            "BLOCK_K": block_k,
            "GROUP_M": 1,
            "num_warps": 4,
            "num_stages": 4,
        }
    if m <= 64:
        return {
            "BLOCK_M": 64,
            "BLOCK_N": 64,
            "BLOCK_K": block_k,
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 4,
        }
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _check(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"scaled_gemm: a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scaled_gemm: a is [M, K={a.shape[1]}] but b is [N, K={b.shape[1]}]")
    if a.dtype != b.dtype or a.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"scaled_gemm: a and b must both be int8 or float8_e4m3fn, got {a.dtype}, {b.dtype}")
    if a_scale.shape != (a.shape[0],) or b_scale.shape != (b.shape[0],):
        raise ValueError(
            f"scaled_gemm: scales must be [M]={a.shape[0]} and [N]={b.shape[0]}, "
            f"got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )


def launch_scaled_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    out: torch.Tensor,
    launcher: Any = None,
) -> torch.Tensor:
    """Run the kernel into ``out`` [M, N]. ``launcher`` wraps the kernel (``wrap_triton``
    inside a ``torch.library.triton_op``); by default the kernel is launched directly."""
    _check(a, b, a_scale, b_scale)
    if act not in ACTIVATIONS:
        raise ValueError(f"scaled_gemm: act {act!r} is not one of {', '.join(ACTIVATIONS)}")
    if out.dtype not in OUT_DTYPES:
        raise ValueError(f"scaled_gemm: output dtype {out.dtype} is not one of fp16, bf16, fp32")
    m, k = a.shape
    n = b.shape[0]
    int8 = a.dtype == torch.int8
    cfg = gemm_config(m, n, k, int8)
    if not int8 and k % cfg["BLOCK_K"] != 0:
        raise ValueError(f"scaled_gemm: fp8 needs K to be a multiple of 32, got K={k}")
    kernel = _scaled_gemm_kernel if launcher is None else launcher(_scaled_gemm_kernel)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    kernel[grid](
        a,
        b,
        out,
        a_scale.float().contiguous(),
        b_scale.float().contiguous(),
        out if bias is None else bias.contiguous(),  # any pointer when HAS_BIAS is off
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[act],
        INT8=int8,
        **cfg,
    )
    return out


def scaled_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str = "none",
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``act(a_scale[:, None] · (a @ bᵀ) · b_scale + bias)`` by the Triton kernel."""
    out = torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    return launch_scaled_gemm(a, b, a_scale, b_scale, bias, act, out)


def arch_specs() -> list[KernelSpec]:
    """The GEMM specialisations worth building per architecture (large-M tiles)."""
    specs = []
    for name, op, int8, act, min_cc in (
        ("w8a8_gemm", "*i8", True, 0, 80),
        ("w8a8_gemm_gelu", "*i8", True, 1, 80),
        ("fp8_gemm", "*fp8e4nv", False, 0, 89),
    ):
        # the large-M tiles of gemm_config, spelled out: under the interpreter it returns tiny ones
        tiles = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128 if int8 else 64, "GROUP_M": 8}
        signature = {
            "a_ptr": op,
            "b_ptr": op,
            "c_ptr": "*fp16",
            "a_scale_ptr": "*fp32",
            "b_scale_ptr": "*fp32",
            "bias_ptr": "*fp16",
            **{s: "i32" for s in ("M", "N", "K", "stride_am", "stride_ak", "stride_bn")},
            **{s: "i32" for s in ("stride_bk", "stride_cm", "stride_cn")},
            **{c: "constexpr" for c in ("HAS_BIAS", "ACT", "INT8", *tiles)},
        }
        specs.append(
            KernelSpec(
                name=name,
                fn=_scaled_gemm_kernel,
                signature=signature,
                constexprs={"HAS_BIAS": True, "ACT": act, "INT8": int8, **tiles},
                min_cc=min_cc,
                tensor_core="mma",
                num_warps=8,
                num_stages=3,
            )
        )
    return specs
