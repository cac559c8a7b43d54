"""Sparse24Linear: a linear layer whose 2:4-sparse weight is stored compressed.

Method. NVIDIA's semi-structured (2:4) sparsity (Mishra et al., "Accelerating Sparse
Deep Neural Networks", 2021): with at most two non-zeros in every group of four along
K, Ampere-and-later sparse tensor cores skip the zeros, and the weight is stored as the
kept values [N, K/2] plus 2 bits of position per value (see ``sparse24.py`` for the
layout).

Storage. The module holds exactly what the GPU runs: ``values`` and ``meta`` in
CUTLASS's layout, built by the Triton compression kernel on CUDA (torch's bit-identical
reference on CPU, or wherever Triton is not installed), and the bias in fp32. Float weights are compressed in fp16 unless
they already are fp16 / bf16: CUTLASS runs float32 as TF32 with a 1:2 pattern, which a
2:4-pruned weight does not have (pass ``dtype=torch.float32`` for a 1:2 weight).

Paths.
- ``cutlass`` (``auto`` on a CUDA GPU of compute capability 8.0+): a
  ``SparseSemiStructuredTensorCUTLASS`` wrapping our own (values, meta), run by
  ``F.linear``, which dispatches to torch's CUTLASS sparse GEMM.
- ``cusparselt``: ``torch.sparse.to_sparse_semi_structured`` of the dense weight (torch
  compresses it itself, for cuSPARSELt).
- ``reference`` (``auto`` elsewhere, e.g. CPU): the dense masked weight, rebuilt from
  (values, meta), in a plain ``F.linear``: the same numbers the sparse GEMM multiplies.

The module is for inference (its weight is a buffer); 2:4 fine-tuning happens before,
on the dense masked ``nn.Linear``. No claim of speed is made here: whether the sparse
GEMM beats the dense one depends on shape and GPU and is for the benchmarks to show.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.sparse24_format import (
    FORMATS,
    check_compressible,
    sparse24_compress_ref,
    sparse24_decompress,
)
from compressor.kernels.triton_support import HAS_TRITON

logger = logging.getLogger(__name__)

Backend = Literal["auto", "cutlass", "cusparselt", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "cutlass", "cusparselt", "reference")
# int8 2:4 needs int8 activations too (a W8A8 sparse GEMM): not this module's job
WEIGHT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def compress_24(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of a 2:4 weight: the Triton kernel on CUDA when Triton is installed,
    torch's reference otherwise.

    Both give the same bits; on CPU the reference is used because the Triton interpreter
    is far slower than torch's vectorised version for full-size weights.
    """
    if dense.is_cuda and HAS_TRITON:
        from compressor.kernels.sparse24 import sparse24_compress  # imports triton

        return sparse24_compress(dense)
    return sparse24_compress_ref(dense)


def sparse_cuda_capable(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU with sparse tensor cores (compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


class Sparse24Linear(nn.Module):
    """A linear layer with a compressed 2:4 weight; see the module docstring."""

    values: torch.Tensor
    meta: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Sparse24Linear: backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if dtype not in WEIGHT_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
            raise ValueError(f"Sparse24Linear: weight dtype {dtype} is not one of {names}")
        fmt = FORMATS[dtype]
        if out_features % fmt.min_rows or in_features % fmt.min_cols or not out_features or not in_features:
            raise ValueError(
                f"Sparse24Linear: [out_features={out_features}, in_features={in_features}] is not supported "
                f"for {dtype}: CUTLASS's sparse GEMM needs out_features a multiple of {fmt.min_rows} and "
                f"in_features a multiple of {fmt.min_cols}; leave this layer dense"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.backend: Backend = backend
        k = in_features
        self.register_buffer("values", torch.zeros(out_features, k // 2, dtype=dtype))
        self.register_buffer(
            "meta", torch.zeros(out_features, k // (fmt.ksparse * fmt.quads_per_meta), dtype=fmt.meta_dtype)
        )
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # derived weights per (path, device, buffer versions); never saved
        self._cache_key: tuple[object, ...] | None = None
        self._cache_weight: torch.Tensor | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        dtype: torch.dtype | None = None,
        backend: Backend = "auto",
    ) -> Sparse24Linear:
        """Compress ``linear``'s 2:4 weight (times its ``weight_mask`` when it has one).

        ``dtype`` is the dtype the weight is stored and multiplied in: by default the
        weight's own when fp16 / bf16, else fp16. Raises ValueError when the weight is
        not 2:4 or its shape is not one CUTLASS's sparse GEMM takes.
        """
        w = linear.weight.detach()
        mask = getattr(linear, "weight_mask", None)
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(
                    f"Sparse24Linear.from_linear: weight_mask shape {tuple(mask.shape)} != weight "
                    f"shape {tuple(w.shape)}"
                )
            w = w * mask.to(w.dtype)
        if dtype is None:
            dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, backend)
        w = w.to(dtype).contiguous()
        check_compressible(w)
        values, meta = compress_24(w)
        m.values.copy_(values)
        m.meta.copy_(meta)
        if linear.bias is not None and m.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        logger.debug(
            "Sparse24Linear [%d, %d] %s: %d bytes compressed (dense %d)",
            m.out_features,
            m.in_features,
            dtype,
            m.weight_bytes(),
            w.numel() * w.element_size() + (0 if m.bias is None else 4 * m.out_features),
        )
        return m

    def dense_weight(self) -> torch.Tensor:
        """The dense masked weight [N, K] in the storage dtype, rebuilt from (values, meta)."""
        return sparse24_decompress(self.values, self.meta)

    def resolve_backend(self, device: torch.device) -> str:
        """The path a forward on ``device`` takes."""
        if self.backend == "auto":
            return "cutlass" if sparse_cuda_capable(device) else "reference"
        if self.backend in ("cutlass", "cusparselt") and not sparse_cuda_capable(device):
            raise RuntimeError(
                f"Sparse24Linear: backend {self.backend!r} needs a CUDA GPU of compute capability 8.0+, "
                f"the input is on {device}; use backend='reference' (or 'auto') there"
            )
        return self.backend

    def _weight_for(self, path: str) -> torch.Tensor:
        key = (
            path,
            self.values.device,
            self.values.data_ptr(),
            self.values._version,
            self.meta.data_ptr(),
            self.meta._version,
        )
        if self._cache_key != key or self._cache_weight is None:
            if path == "cutlass":
                # our own compressed tensors, no second compression
                self._cache_weight = torch.sparse.SparseSemiStructuredTensorCUTLASS(
                    torch.Size((self.out_features, self.in_features)),
                    packed=self.values,
                    meta=self.meta,
                    packed_t=None,
                    meta_t=None,
                    compressed_swizzled_bitmask=None,
                )
            elif path == "cusparselt":
                self._cache_weight = torch.sparse.to_sparse_semi_structured(self.dense_weight())
            else:
                self._cache_weight = self.dense_weight()
            self._cache_key = key
        return self._cache_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Sparse24Linear: input has {x.shape[-1]} features, the layer takes {self.in_features}"
            )
        path = self.resolve_backend(x.device)
        weight = self._weight_for(path)
        if path == "reference":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, weight.to(x.dtype), bias)
        # the sparse GEMM multiplies in the storage dtype and takes 2-D contiguous input
        dtype = self.values.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype).contiguous()  # [M, K]
        bias = None if self.bias is None else self.bias.to(dtype)
        y = F.linear(x2, weight, bias)  # [M, N]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes of weight the GPU reads: kept values + metadata (+ fp32 bias)."""
        n = self.values.numel() * self.values.element_size() + self.meta.numel() * self.meta.element_size()
        return n + (0 if self.bias is None else 4 * self.bias.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"dtype={self.values.dtype}, backend={self.backend}"
        )
