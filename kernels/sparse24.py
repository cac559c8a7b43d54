"""2:4 compression: a dense 2:4-sparse weight to CUTLASS's (values, metadata) layout.

Math. A weight ``W`` [N, K] is 2:4 sparse when every aligned group of four along K,
``W[n, 4g : 4g + 4]``, holds at most two non-zeros (``-0.0`` counts as zero, as in
``W != 0``). Sparse tensor cores (sm_80+) take it as

- ``values`` [N, K/2], same dtype as ``W``: the two kept elements of each group, in
  order: ``values[n, 2g + j] = W[n, 4g + idx_j]`` with ``idx_0 < idx_1``;
- ``meta`` [N, K/(4·Q)] of int16 (Q = 4, fp16 / bf16 / fp32) or int32 (Q = 8, int8):
  the 4-bit code ``idx_0 | idx_1 << 2`` of group ``g = c·Q + q`` sits at bits
  ``4q .. 4q + 3`` of ``meta[n, c]``. A group with fewer than two non-zeros keeps zeros
  at fixed positions (the encodings of CUTLASS, chosen so the same bits serve 1:2).

float32 runs on TF32 sparse tensor cores, whose pattern is 1:2: every aligned pair
``W[n, 2p : 2p + 2]`` keeps one element, ``values[n, p]``, coded as 0b0100 (first)
or 0b1110 (second) in the same four-bit slots (one slot per pair).

Layout of ``meta``. CUTLASS reads the metadata of a tile in the order its ``ldmatrix``
loads them, so the [N, C] code matrix is stored permuted (``reorder_meta()`` in
CUTLASS's ``host_reorder.h``; ``ColumnMajorInterleaved<2>``):

    row' = r // G · G + (r % 8) · I + (r % G) // 8       G, I = 32, 4 (int16) / 16, 2 (int32)
    (row', c) -> (row' + 1, c - 1) if row' even and c odd;  (row' - 1, c + 1) if row' odd and c even
    flat offset = (c // 2) · 2N + 2 · row' + c % 2          into meta viewed as [N · C]

i.e. rows are interleaved within groups of G, the off-diagonal elements of every 2×2
block swap, and column pairs are stored column-major. torch's pure-torch reference is
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``
(``sparse24_compress_ref`` in ``compressor.kernels.sparse24_format``, with the format's checks);
the kernel here is bit-identical to it (values and meta) and replaces its chain of
full-size temporaries with one pass over ``W``.

Kernel. Each program takes BLOCK_N rows × BLOCK_C metadata columns, i.e. a
[BLOCK_N, BLOCK_C, Q] block of groups, loads the four (two for fp32) elements of each
group, builds the codes with CUTLASS's Boolean formulas, gathers the kept values, ORs
the Q codes of a metadata element together (a sum: their bits are disjoint) and
scatters it to its reordered offset. Elements move as raw bits (fp16 / bf16 viewed as
int16, fp32 as int32), so values are copied exactly and bf16 needs no float support.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from compressor.kernels.sparse24_format import FORMATS, check_compressible
from compressor.kernels.spec import KernelSpec

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configs

# A one-off pass over the weight at load time, memory-bound: a fixed tile of a few
# thousand elements per program is plenty; no autotuning.
BLOCK_N = 32
BLOCK_C = 4


# --------------------------------------------------------------------------- kernel


@triton.jit
def _nonzero(x, IS_FLOAT: tl.constexpr, ABS_MASK: tl.constexpr):
    """1 where the element is non-zero (for floats on raw bits: ``-0.0`` is zero), else 0."""
    if IS_FLOAT:
        nz = (x & ABS_MASK) != 0
    else:
        nz = x != 0
    return nz.to(tl.int32)


@triton.jit
def _sparse24_compress_kernel(
    dense_ptr,
    values_ptr,
    meta_ptr,
    N,
    meta_ncols,
    stride_dn,
    stride_dk,
    stride_vn,
    stride_vk,
    KSPARSE: tl.constexpr,
    QUADS: tl.constexpr,
    META_GROUP: tl.constexpr,
    META_INTERWEAVE: tl.constexpr,
    IS_FLOAT: tl.constexpr,
    ABS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] weight rows
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC] metadata columns
    rq = tl.arange(0, QUADS)  # [Q] code slot within a metadata element
    n3 = rn[:, None, None]  # [BN, 1, 1]
    g3 = rc[None, :, None] * QUADS + rq[None, None, :]  # [1, BC, Q] group index along K
    mask3 = (n3 < N) & (rc[None, :, None] < meta_ncols)  # [BN, BC, Q]
    src = dense_ptr + n3 * stride_dn + (g3 * KSPARSE) * stride_dk

    if KSPARSE == 4:
        x0 = tl.load(src, mask=mask3, other=0)
        x1 = tl.load(src + stride_dk, mask=mask3, other=0)
        x2 = tl.load(src + 2 * stride_dk, mask=mask3, other=0)
        x3 = tl.load(src + 3 * stride_dk, mask=mask3, other=0)
        m0 = _nonzero(x0, IS_FLOAT, ABS_MASK)
        m1 = _nonzero(x1, IS_FLOAT, ABS_MASK)
        m3 = _nonzero(x3, IS_FLOAT, ABS_MASK)
        # CUTLASS's encoding (Espresso-minimised): idx0 = bit0 | bit1 << 1 is the first kept
        # position, idx1 = bit2 | bit3 << 1 the second; m2 is implied by 2:4.
        expr0 = m0 & m1
        expr1 = (1 - m0) & m1
        expr2 = (1 - m0) & (1 - m1)
        idx0 = expr1 | (expr2 << 1)
        idx1 = (expr0 | expr2 | m3) | ((expr1 | (1 - m1)) << 1)
        v0 = tl.where(idx0 == 0, x0, tl.where(idx0 == 1, x1, tl.where(idx0 == 2, x2, x3)))
        v1 = tl.where(idx1 == 0, x0, tl.where(idx1 == 1, x1, tl.where(idx1 == 2, x2, x3)))
        dst = values_ptr + n3 * stride_vn + (2 * g3) * stride_vk
        tl.store(dst, v0, mask=mask3)
        tl.store(dst + stride_vk, v1, mask=mask3)
        code = idx0 | (idx1 << 2)  # [BN, BC, Q] int32 in 0..15
    else:
        # 1:2 (float32 / TF32): keep the first element of the pair unless it is zero
        x0 = tl.load(src, mask=mask3, other=0)
        x1 = tl.load(src + stride_dk, mask=mask3, other=0)
        m0 = _nonzero(x0, IS_FLOAT, ABS_MASK)
        tl.store(values_ptr + n3 * stride_vn + g3 * stride_vk, tl.where(m0 == 1, x0, x1), mask=mask3)
        code = tl.where(m0 == 1, 0b0100, 0b1110)

    # Q codes -> one metadata element; the bits are disjoint, so the sum is their OR (the
    # top code of an int32 element wraps to negative exactly as torch's int32 shifts do).
    meta = tl.sum(code << (4 * rq[None, None, :]), axis=2)  # [BN, BC] int32

    # CUTLASS metadata reordering (see the module docstring)
    r = rn[:, None]  # [BN, 1]
    c = rc[None, :]  # [1, BC]
    row = r // META_GROUP * META_GROUP + (r % 8) * META_INTERWEAVE + (r % META_GROUP) // 8
    swap = ((row % 2 == 0) & (c % 2 == 1)).to(tl.int32) - ((row % 2 == 1) & (c % 2 == 0)).to(tl.int32)
    row = row + swap
    col = c - swap
    offs = (col // 2) * (2 * N) + row * 2 + col % 2  # [BN, BC]
    mask2 = (r < N) & (c < meta_ncols)
    tl.store(meta_ptr + offs, meta.to(meta_ptr.dtype.element_ty), mask=mask2)


# --------------------------------------------------------------------------- launcher


def _launch(
    dense: torch.Tensor, launcher: Callable[[Any], Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate (values, meta) and run the kernel; ``dense`` is already checked."""
    fmt = FORMATS[dense.dtype]
    n, k = dense.shape
    meta_ncols = k // (fmt.ksparse * fmt.quads_per_meta)
    values = torch.empty((n, k // 2), dtype=dense.dtype, device=dense.device)
    meta = torch.empty((n, meta_ncols), dtype=fmt.meta_dtype, device=dense.device)
    is_float = dense.dtype.is_floating_point
    abs_mask = (1 << (fmt.bits_dtype.itemsize * 8 - 1)) - 1  # every bit but the sign
    kernel = _sparse24_compress_kernel if launcher is None else launcher(_sparse24_compress_kernel)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(meta_ncols, BLOCK_C))
    values_bits = values.view(fmt.bits_dtype)
    kernel[grid](
        dense.view(fmt.bits_dtype),
        values_bits,
        meta,
        n,
        meta_ncols,
        dense.stride(0),
        dense.stride(1),
        values_bits.stride(0),
        values_bits.stride(1),
        KSPARSE=fmt.ksparse,
        QUADS=fmt.quads_per_meta,
        META_GROUP=fmt.meta_group,
        META_INTERWEAVE=fmt.meta_interweave,
        IS_FLOAT=is_float,
        ABS_MASK=abs_mask,
        BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C,
    )
    return values, meta


@torch.library.triton_op("compressor::sparse24_compress", mutates_args=())
def _sparse24_compress_op(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(dense, launcher=torch.library.wrap_triton)


# --------------------------------------------------------------------------- public


def sparse24_compress(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse weight [N, K] into CUTLASS's (values [N, K/2], meta) by the kernel.

    Bit-identical to ``sparse_semi_structured_from_dense_cutlass``; raises ValueError when
    the dtype, the shape or the sparsity pattern is not one CUTLASS's sparse GEMM takes.
    """
    check_compressible(dense)
    if dense.stride(-1) != 1:
        # raw-bit views need a unit inner stride
        dense = dense.contiguous()
    return _sparse24_compress_op(dense)


def arch_specs() -> list[KernelSpec]:
    """The compression kernel per element width: no GEMM, so no tensor-core check."""
    specs = []
    for name, dtype in (
        ("sparse24_compress_fp16", torch.float16),
        ("sparse24_compress_fp32", torch.float32),
        ("sparse24_compress_int8", torch.int8),
    ):
        fmt = FORMATS[dtype]
        bits = {torch.int16: "*i16", torch.int32: "*i32", torch.int8: "*i8"}[fmt.bits_dtype]
        meta = {torch.int16: "*i16", torch.int32: "*i32"}[fmt.meta_dtype]
        constexprs = {
            "KSPARSE": fmt.ksparse,
            "QUADS": fmt.quads_per_meta,
            "META_GROUP": fmt.meta_group,
            "META_INTERWEAVE": fmt.meta_interweave,
            "IS_FLOAT": dtype.is_floating_point,
            "ABS_MASK": (1 << (fmt.bits_dtype.itemsize * 8 - 1)) - 1,
            "BLOCK_N": BLOCK_N,
            "BLOCK_C": BLOCK_C,
        }
        signature = {
            "dense_ptr": bits,
            "values_ptr": bits,
            "meta_ptr": meta,
            **{s: "i32" for s in ("N", "meta_ncols", "stride_dn", "stride_dk", "stride_vn", "stride_vk")},
            **{c: "constexpr" for c in constexprs},
        }
        specs.append(
            KernelSpec(
                name=name,
                fn=_sparse24_compress_kernel,
                signature=signature,
                constexprs=constexprs,
                min_cc=80,
                tensor_core=None,
                num_warps=4,
                num_stages=1,
            )
        )
    return specs
