"""2:4 sparsity: the CUTLASS compressed format (values, metadata), its checks and torch's reference.

Pure torch, no Triton: ``Sparse24Linear`` compresses with the reference on the CPU (and
everywhere Triton is not installed) and decompresses with it; the Triton compression
kernel (``compressor.kernels.sparse24``, which documents the layout) must match
``sparse24_compress_ref`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sparse24Format:
    """How one weight dtype is compressed for CUTLASS's sparse GEMM."""

    bits_dtype: torch.dtype  # the integer dtype the kernel moves the elements as
    meta_dtype: torch.dtype
    ksparse: int  # elements per coded group: 4 (2:4), or 2 (1:2, float32)
    min_rows: int  # N must be a positive multiple (SparseSemiStructuredTensorCUTLASS)
    min_cols: int  # K likewise

    @property
    def quads_per_meta(self) -> int:
        """Four-bit codes per metadata element (Q)."""
        return self.meta_dtype.itemsize * 2

    @property
    def meta_group(self) -> int:
        """Rows interleaved together by the metadata reordering (G)."""
        return 32 if self.meta_dtype.itemsize == 2 else 16

    @property
    def meta_interweave(self) -> int:
        """The row stride of the interleave (I)."""
        return 4 if self.meta_dtype.itemsize == 2 else 2


# Minimum / multiple shapes are torch's SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS
# (sparse_min_rows, sparse_min_cols): the CUTLASS kernels' tile sizes.
FORMATS: dict[torch.dtype, Sparse24Format] = {
    torch.float16: Sparse24Format(torch.int16, torch.int16, 4, 32, 64),
    torch.bfloat16: Sparse24Format(torch.int16, torch.int16, 4, 32, 64),
    torch.float32: Sparse24Format(torch.int32, torch.int16, 2, 32, 32),
    torch.int8: Sparse24Format(torch.int8, torch.int32, 4, 16, 128),
}


def _count_dense_groups(w: torch.Tensor, group: int, keep: int) -> int:
    """How many aligned groups of ``group`` along the last dim hold more than ``keep`` non-zeros."""
    if w.shape[-1] % group:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {group}")
    nnz = (w.detach() != 0).reshape(*w.shape[:-1], w.shape[-1] // group, group).sum(-1)
    return int((nnz > keep).sum())


def is_24_sparse(w: torch.Tensor) -> bool:
    """Whether every aligned group of four along ``w``'s last dim has at most two non-zeros."""
    if w.dim() < 1:
        raise ValueError("is_24_sparse: expected a tensor with at least one dimension, got a scalar")
    if w.shape[-1] % 4:
        return False
    return _count_dense_groups(w, 4, 2) == 0


def check_compressible(dense: torch.Tensor) -> Sparse24Format:
    """Raise ValueError naming what is wrong unless ``dense`` can be compressed; return its format."""
    if dense.dim() != 2:
        raise ValueError(f"sparse24: expected a 2-D weight [N, K], got shape {tuple(dense.shape)}")
    fmt = FORMATS.get(dense.dtype)
    if fmt is None:
        names = ", ".join(str(d).removeprefix("torch.") for d in FORMATS)
        raise ValueError(f"sparse24: dtype {dense.dtype} is not one of {names}")
    n, k = dense.shape
    if n < fmt.min_rows or n % fmt.min_rows or k < fmt.min_cols or k % fmt.min_cols:
        raise ValueError(
            f"sparse24: weight shape [N={n}, K={k}] is not supported for {dense.dtype}: CUTLASS's "
            f"sparse GEMM needs N a multiple of {fmt.min_rows} and K a multiple of {fmt.min_cols}; "
            "pad the layer or leave it dense"
        )
    if n * k >= 2**31:
        raise ValueError(f"sparse24: weight [N={n}, K={k}] has 2^31 or more elements (int32 offsets)")
    bad = _count_dense_groups(dense, 4, 2)
    if bad:
        raise ValueError(
            f"sparse24: weight [N={n}, K={k}] is not 2:4 sparse: {bad} of {n * k // 4} groups of four "
            "along K hold more than two non-zeros (prune it first, e.g. with the sparse24 pass)"
        )
    if fmt.ksparse == 2:
        bad = _count_dense_groups(dense, 2, 1)
        if bad:
            raise ValueError(
                f"sparse24: float32 weights run on TF32 sparse tensor cores, which need 1:2 sparsity, "
                f"but {bad} of {n * k // 2} pairs along K hold two non-zeros; convert to fp16 / bf16 "
                "for 2:4"
            )
    return fmt


# --------------------------------------------------------------------------- reference


def sparse24_compress_ref(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's pure-torch CUTLASS compression (the reference the kernel must match bit for bit)."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    check_compressible(dense)
    return sparse_semi_structured_from_dense_cutlass(dense)


def sparse24_decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense [N, K] from CUTLASS (values, meta), by torch's reference ``..._to_dense_cutlass``.

    float32 goes through torch's 2:4 path on the raw bits (each float is two 16-bit
    halves, which is how the metadata addresses it): torch's own float32 branch scatters
    the halves as fp16, which quiets any half that reads as a signalling NaN and so flips
    a mantissa bit of the float.
    """
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    if values.dtype == torch.float32:
        halves = values.contiguous().view(torch.int16)  # [N, K] halves of [N, K/2] floats
        return sparse_semi_structured_to_dense_cutlass(halves, meta).view(torch.float32)
    return sparse_semi_structured_to_dense_cutlass(values, meta)


def sparse24_metadata_bytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Bytes of CUTLASS metadata for an [n, k] weight of ``dtype`` (2 bits per kept element)."""
    fmt = FORMATS[dtype]
    return n * (k // (fmt.ksparse * fmt.quads_per_meta)) * fmt.meta_dtype.itemsize
