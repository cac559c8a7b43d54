"""W4A16: group-wise int4 weights times fp16/bf16/fp32 activations, dequantized in-register.

Math. With ``g = k // group_size`` and unsigned 4-bit codes ``c[k, n]`` in ``[0, 15]``::

    W[k, n] = (c[k, n] - zeros[g, n]) * scales[g, n]          (K x N, the transposed Linear weight)
    y[m, n] = sum_k x[m, k] * W[k, n] + bias[n]                (fp32 accumulation)

This is the GPTQ / AWQ / ONNX ``MatMulNBits`` weight format with the codes offset to
unsigned, so one kernel serves symmetric and asymmetric weights. The layout
(``pack_w4a16``: int32 ``[K // 8, N]`` codes, fp32 and uint8 ``[K // group_size, N]``
scales and zeros) and the packing live in ``compressor.kernels.int4_format``; the torch
reference is ``compressor.kernels.reference.w4a16_gemm_ref``. A weight tile of BLOCK_K
rows is BLOCK_K / 8 rows of int32.

Kernel. Each program owns a BLOCK_M x BLOCK_N tile of ``y`` and walks K in steps of
BLOCK_K: it loads the activation tile, loads the packed words (each int32 row is
fetched for the 8 K rows it holds; they hit L1), shifts and masks the nibbles,
dequantizes with the group's scale and zero in fp32, casts the tile to the
activation dtype and feeds ``tl.dot`` (fp16 x fp16 -> fp32 is an ``mma`` on sm_80+).
BLOCK_K divides ``group_size`` (one scale row per tile) or ``group_size`` divides
BLOCK_K (a scale per tile row). Split-K (decode shapes, M <= 16, where an M x N grid
has too few programs to fill the GPU): grid axis 1 splits K into SPLIT_K slices of
whole BLOCK_K tiles and each program ``tl.atomic_add``s its fp32 partial sum into a
zeroed fp32 buffer, which the launcher casts to the activation dtype.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compressor.kernels.int4_format import PACK_FACTOR
from compressor.kernels.scaled_gemm import grouped_tile
from compressor.kernels.spec import KernelSpec

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class W4A16Config:
    """Tile shape and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


_SPLIT_K_MAX_M = 16  # decode shapes: below this an M x N grid underfills the GPU
_SPLIT_K_MAX = 16
_BLOCK_K_CHOICES = (64, 32, 16)


def _default_num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 108  # A100; only shapes the split under the CPU interpreter


def pick_block_k(group_size: int) -> int:
    """The largest BLOCK_K that divides ``group_size`` (one scale row per tile), else the
    largest that ``group_size`` divides (a scale row per K row of the tile)."""
    for bk in _BLOCK_K_CHOICES:
        if group_size % bk == 0:
            return bk
    for bk in _BLOCK_K_CHOICES:
        if bk % group_size == 0:
            return bk
    raise ValueError(
        f"group_size={group_size} is not supported by the W4A16 kernel: it must be a multiple "
        f"of 16 or divide 64 (group sizes 32, 64, 128 are the usual ones)"
    )


def pick_config(m: int, n: int, group_size: int) -> W4A16Config:
    """Tile shape for an M x N output (heuristic; tl.dot needs every block dim >= 16)."""
    block_k = pick_block_k(group_size)
    if m <= 16:
        return W4A16Config(16, 64, block_k, num_warps=4, num_stages=4)
    if m <= 32:
        return W4A16Config(32, 64, block_k, num_warps=4, num_stages=4)
    if m <= 64 or n <= 64:
        return W4A16Config(64, 64, block_k, num_warps=4, num_stages=3)
    return W4A16Config(128, 128, block_k, num_warps=8, num_stages=3)


def pick_split_k(m: int, n: int, k: int, config: W4A16Config, num_sms: int) -> int:
    """K slices for small M: enough programs for about two waves, each >= one BLOCK_K tile."""
    if m > _SPLIT_K_MAX_M:
        return 1
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    return max(1, min(k_tiles, _SPLIT_K_MAX, math.ceil(2 * num_sms / tiles)))


# --------------------------------------------------------------------------- kernel


# fmt: off
@triton.jit
def _dequant_tile(
    w_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, mask_k, mask_n,
    stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # fmt: on
    """The [BLOCK_K, BLOCK_N] fp32 weight tile at rows ``offs_k``: codes unpacked and dequantized."""
    # Row k of the tile lives in word k // 8, nibble k % 8.
    words = tl.load(
        w_ptr + (offs_k[:, None] // 8) * stride_wk + offs_n[None, :] * stride_wn,
        mask=mask_k[:, None] & mask_n[None, :],
        other=0,
    )
    codes = ((words >> ((offs_k[:, None] % 8) * 4)) & 0xF).to(tl.float32)
    if BLOCK_K <= GROUP_SIZE:
        g = k0 // GROUP_SIZE  # the whole tile is one group: one scale row
        scale = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
        zero = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0)
        w = (codes - zero.to(tl.float32)[None, :]) * scale.to(tl.float32)[None, :]
    else:
        g2 = offs_k[:, None] // GROUP_SIZE  # several groups per tile: a scale per row
        mask_kn = mask_k[:, None] & mask_n[None, :]
        scale2 = tl.load(scales_ptr + g2 * stride_sg + offs_n[None, :] * stride_sn, mask=mask_kn, other=0.0)
        zero2 = tl.load(zeros_ptr + g2 * stride_zg + offs_n[None, :] * stride_zn, mask=mask_kn, other=0)
        w = (codes - zero2.to(tl.float32)) * scale2.to(tl.float32)
    return w


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_ym,
    stride_yn,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = x @ dequant(W) (+ bias); SPLIT_K > 1 atomically adds fp32 partials into y."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # This program's K slice: whole BLOCK_K tiles, so a tile never straddles a group
    # boundary when BLOCK_K divides GROUP_SIZE.
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            w_ptr, scales_ptr, zeros_ptr, k0, offs_k, offs_n, mask_k, mask_n,
            stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, BLOCK_K,
        )  # fmt: skip
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            acc += bias[None, :]
        else:
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # added by one slice only

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_mn)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask_mn)


# --------------------------------------------------------------------------- launcher


def _check_inputs(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """(M, K, N) after checking every shape, dtype and device; ValueError names the culprit."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of float16, bfloat16, float32")
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32 [K/8, N], got {packed.dtype} {tuple(packed.shape)}")
    m, k = x.shape
    k_packed, n = packed.shape
    if k != k_packed * PACK_FACTOR:
        raise ValueError(
            f"x has K={k} columns but packed {tuple(packed.shape)} holds K={k_packed * PACK_FACTOR} rows"
        )
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} must be positive and divide K={k}")
    n_groups = k // group_size
    if tuple(scales.shape) != (n_groups, n):
        raise ValueError(f"scales shape {tuple(scales.shape)} != (K/group_size, N) = {(n_groups, n)}")
    if tuple(zeros.shape) != (n_groups, n):
        raise ValueError(f"zeros shape {tuple(zeros.shape)} != (K/group_size, N) = {(n_groups, n)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != (N,) = {(n,)}")
    for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return m, k, n


def _launch(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    split_k: int | None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    m, k, n = _check_inputs(x, packed, scales, zeros, group_size, bias)
    cfg = config or pick_config(m, n, group_size)
    if group_size % cfg.block_k and cfg.block_k % group_size:
        raise ValueError(f"BLOCK_K={cfg.block_k} and group_size={group_size}: neither divides the other")
    if split_k is None:
        split_k = pick_split_k(m, n, k, cfg, _default_num_sms(x.device))
    if split_k < 1:
        raise ValueError(f"split_k={split_k} must be >= 1")
    # Drop empty slices: every slice gets ceil(k_tiles / split_k) whole tiles.
    k_tiles = triton.cdiv(k, cfg.block_k)
    split_k = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split_k))
    logger.debug("w4a16 M=%d N=%d K=%d group=%d: %s, split_k=%d", m, n, k, group_size, cfg, split_k)
    if split_k == 1:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        y = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    torch.library.wrap_triton(_w4a16_gemm_kernel)[grid](
        x,
        packed,
        scales,
        zeros,
        bias if bias is not None else scales,  # never read without HAS_BIAS
        y,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        packed.stride(0),
        packed.stride(1),
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0),
        zeros.stride(1),
        y.stride(0),
        y.stride(1),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y if split_k == 1 else y.to(x.dtype)


@torch.library.triton_op("compressor::w4a16_linear", mutates_args=())
def _w4a16_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    lead = x.shape[:-1]
    y = _launch(x.reshape(-1, x.shape[-1]), packed, scales, zeros, group_size, bias, split_k)  # (M, N)
    return y.reshape(*lead, packed.shape[1])


# --------------------------------------------------------------------------- public


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``x [..., K] @ dequant(W) [K, N] (+ bias)`` -> ``[..., N]`` in x's dtype, on the
    Triton kernel (the ``compressor::w4a16_linear`` op). ``split_k=None`` picks split-K
    for M <= 16 rows; 1 forces the plain kernel."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., K] with K > 0, got {tuple(x.shape)}")
    if x.numel() == 0:
        return x.new_zeros((*x.shape[:-1], packed.shape[1]))
    return torch.ops.compressor.w4a16_linear(x.contiguous(), packed, scales, zeros, group_size, bias, split_k)


# --------------------------------------------------------------------------- arch report


def _signature(x_type: str, y_type: str) -> dict[str, str]:
    sig = {
        "x_ptr": x_type,
        "w_ptr": "*i32",
        "scales_ptr": "*fp32",
        "zeros_ptr": "*u8",
        "bias_ptr": "*fp32",
        "y_ptr": y_type,
    }
    for name in ("M", "N", "K", "stride_xm", "stride_xk", "stride_wk", "stride_wn", "stride_sg"):
        sig[name] = "i32"
    for name in ("stride_sn", "stride_zg", "stride_zn", "stride_ym", "stride_yn"):
        sig[name] = "i32"
    for name in ("GROUP_SIZE", "HAS_BIAS", "SPLIT_K", "DOT_PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K"):
        sig[name] = "constexpr"
    sig["GROUP_M"] = "constexpr"
    return sig


def arch_specs() -> list[KernelSpec]:
    """The W4A16 GEMM with fp16 activations, group 128: the prefill tile and the split-K
    decode tile (fp32 atomic partials); both must lower ``tl.dot`` to ``mma``/``wgmma``."""
    common = {"GROUP_SIZE": 128, "HAS_BIAS": True, "DOT_PRECISION": "tf32", "GROUP_M": 8}
    variants = (
        ("w4a16_gemm_fp16_g128", "*fp16", 1, pick_config(256, 4096, 128)),
        ("w4a16_gemm_splitk_fp16_g128", "*fp32", 8, pick_config(1, 4096, 128)),
    )
    return [
        KernelSpec(
            name=name,
            fn=_w4a16_gemm_kernel,
            signature=_signature("*fp16", out_dtype),
            constexprs={
                **common,
                "SPLIT_K": split_k,
                "BLOCK_M": cfg.block_m,
                "BLOCK_N": cfg.block_n,
                "BLOCK_K": cfg.block_k,
            },
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        for name, out_dtype, split_k, cfg in variants
    ]
