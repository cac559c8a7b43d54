"""The group-wise integer weight format (int4 and int8), its RTN quantizer and the W4A16 packing.

Pure torch, no Triton: the passes (RTN, GPTQ, AWQ), the runtime layer ``Int4Linear``, the
exporters and the Triton kernel (``compressor.kernels.w4a16``) all read the format from here.

The one weight format every weight-only quantizer here returns (RTN, GPTQ, AWQ+RTN)::

    W[o, i] ≈ (q[o, i] - zeros[o, g]) * scales[o, g],   g = i // group_size

- ``q``: integers in ``[qmin, qmax]``, stored as int8 (symmetric: ``[-2^(b-1), 2^(b-1)-1]``,
  zero point 0) or uint8 (asymmetric: ``[0, 2^b - 1]``, integer zero point per group).
- ``scales``: float32, shape (out, n_groups); ``zeros``: same dtype as ``q``, shape
  (out, n_groups). ``group_size=None`` means one group per output row (per-channel).

This is the layout of GPTQ/AWQ checkpoints and ONNX ``MatMulNBits`` (block-wise,
per-row), before bit-packing; ``pack_int4`` does the packing (two nibbles a byte).

W4A16 layout (what ``pack_w4a16`` produces for the kernel and ``Int4Linear``; everything
K-major so a BLOCK_K x BLOCK_N tile of any of them is a set of contiguous rows)::

    W[k, n] = (c[k, n] - zeros[g, n]) * scales[g, n]      g = k // group_size, c in [0, 15]

- ``packed``: int32 ``[K // 8, N]``; ``packed[j, n]`` holds the codes of
  ``W[8j + i, n]`` for ``i = 0..7`` in bits ``4i .. 4i+3`` (low nibble first): 4 bits per
  weight in HBM, which is the point, since decode GEMMs are bound by reading the weight.
- ``scales``: float32 ``[K // group_size, N]``.
- ``zeros``: uint8 ``[K // group_size, N]``, values in ``[0, 15]``; a symmetric weight
  (int8 codes in ``[-8, 7]``, zero 0) becomes codes ``q + 8`` with zero point 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES: tuple[int, ...] = (32, 64, 128)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weights plus per-group scale and zero point (see the module docstring)."""

    q: torch.Tensor  # (out, in) int8 (symmetric) or uint8 (asymmetric)
    scales: torch.Tensor  # (out, n_groups) float32
    zeros: torch.Tensor  # (out, n_groups), dtype of q
    bits: int
    group_size: int | None
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        return dequantize_groupwise(self.q, self.scales, self.zeros, self.group_size)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of ``bits``-bit codes."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits} is not one of 2, 3, 4, 8")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _check_groups(in_features: int, group_size: int | None) -> int:
    if group_size is None:
        return in_features
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
    return group_size


def compute_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (rows are the groups), both shape (rows,).

    Symmetric: ``scale = absmax / qmax`` and zero 0 (absmax/qmax rather than
    absmax/|qmin| so +absmax is representable). Asymmetric: the range
    ``[min(w,0), max(w,0)]`` maps onto ``[0, 2^b-1]``. ``clip_ratio`` < 1 (one number, or
    one per row) shrinks the range (clipping search). All-zero rows get scale 1 so the
    scale is always finite.
    """
    qmin, qmax = qrange(bits, symmetric)
    w = w.to(torch.float32)
    if symmetric:
        absmax = w.abs().amax(dim=1) * clip_ratio
        scale = absmax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    wmin = w.amin(dim=1).clamp(max=0) * clip_ratio
    wmax = w.amax(dim=1).clamp(min=0) * clip_ratio
    scale = (wmax - wmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-wmin / scale).clamp(qmin, qmax)
    return scale, zero


def quantize_with_qparams(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Integer codes (as float) of ``w`` (rows, cols) with per-row ``scale``/``zero`` (rows,)."""
    qmin, qmax = qrange(bits, symmetric)
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], qmin, qmax)


def compute_group_qparams(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    clip_ratio: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group float scales and (float) zero points, each shape (out, n_groups);
    ``clip_ratio`` is one number or one per group (out, n_groups)."""
    out_f, in_f = weight.shape
    gs = _check_groups(in_f, group_size)
    groups = weight.detach().to(torch.float32).reshape(out_f * (in_f // gs), gs)  # (out*G, gs)
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.to(torch.float32).reshape(-1)  # (out*G,)
    scale, zero = compute_qparams(groups, bits, symmetric, clip_ratio)
    return scale.reshape(out_f, -1), zero.reshape(out_f, -1)


def _storage_dtype(symmetric: bool) -> torch.dtype:
    return torch.int8 if symmetric else torch.uint8


def quantize_groupwise(
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
) -> torch.Tensor:
    """Integer codes of ``weight`` (out, in) under given group parameters (out, n_groups)."""
    out_f, in_f = weight.shape
    gs = _check_groups(in_f, group_size)
    w = weight.detach().to(torch.float32).reshape(-1, gs)  # (out*G, gs)
    q = quantize_with_qparams(w, scales.reshape(-1).float(), zeros.reshape(-1).float(), bits, symmetric)
    return q.reshape(out_f, in_f).to(_storage_dtype(symmetric))


def dequantize_groupwise(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """Float32 weight (out, in) from codes ``q`` and per-group ``scales``/``zeros``."""
    out_f, in_f = q.shape
    gs = _check_groups(in_f, group_size)
    qg = q.to(torch.float32).reshape(out_f, in_f // gs, gs)  # (out, G, gs)
    w = (qg - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(out_f, in_f)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    clip_ratio: float | torch.Tensor = 1.0,
) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of a Linear weight (out, in); each group's
    range is shrunk by ``clip_ratio`` (one number or (out, n_groups)), the rest saturates."""
    scales, zeros = compute_group_qparams(weight, bits, group_size, symmetric, clip_ratio)
    q = quantize_groupwise(weight, scales, zeros, bits, group_size, symmetric)
    dtype = _storage_dtype(symmetric)
    return QuantizedWeight(q, scales, zeros.to(dtype), bits, group_size, symmetric)


def fake_quantize_rtn(
    weight: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    clip_ratio: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``dequantize(quantize_rtn(weight))``: the float weight the quantized layer computes with."""
    return quantize_rtn(weight, bits, group_size, symmetric, clip_ratio).dequantize()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (out, in) two per byte, low nibble first -> uint8 (out, in/2).

    Symmetric int8 codes in [-8, 7] are offset by 8 into [0, 15] first, so a packed
    symmetric weight dequantizes with a zero point of 8 (the ``MatMulNBits`` default).
    """
    if q.shape[-1] % 2:
        raise ValueError(f"in_features={q.shape[-1]} must be even to pack int4")
    u = q.to(torch.int16)
    if q.dtype == torch.int8:
        u = u + 8
    if u.min() < 0 or u.max() > 15:
        raise ValueError("codes do not fit in 4 bits")
    u = u.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``."""
    lo = packed & 0x0F
    hi = packed >> 4
    u = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return (u.to(torch.int16) - 8).to(torch.int8) if symmetric else u


# --------------------------------------------------------------------------- W4A16 layout

PACK_FACTOR = 8  # int4 codes per int32 word


def pack_w4a16(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed int32 [K/8, N], scales fp32 [G, N], zeros uint8 [G, N])`` from a 4-bit
    ``QuantizedWeight`` (q is (out=N, in=K)); symmetric codes are offset to unsigned
    with zero point 8. The result dequantizes exactly to ``qw.dequantize().t()``."""
    if qw.bits != 4:
        raise ValueError(f"pack_w4a16 needs 4-bit weights, got bits={qw.bits}")
    n, k = qw.q.shape
    if k % PACK_FACTOR:
        raise ValueError(f"in_features={k} must be a multiple of {PACK_FACTOR} to pack int4 into int32")
    q = qw.q.to(torch.int32)
    zeros = qw.zeros.to(torch.int32)
    if qw.q.dtype == torch.int8:  # symmetric [-8, 7] -> [0, 15]
        q = q + 8
        zeros = zeros + 8
    if q.min() < 0 or q.max() > 15:
        raise ValueError(f"codes span [{int(q.min())}, {int(q.max())}], which does not fit in 4 bits")
    if zeros.min() < 0 or zeros.max() > 15:
        raise ValueError(f"zero points span [{int(zeros.min())}, {int(zeros.max())}], outside [0, 15]")
    codes = q.t().reshape(k // PACK_FACTOR, PACK_FACTOR, n)  # (K/8, 8, N)
    shifts = (4 * torch.arange(PACK_FACTOR, dtype=torch.int32, device=q.device)).view(1, -1, 1)
    # int32 wraps: a code >= 8 in the top nibble makes the word negative, which is fine
    # because unpacking shifts then masks with 0xF.
    packed = (codes << shifts).sum(dim=1, dtype=torch.int64)  # (K/8, N), disjoint bits
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    scales = qw.scales.to(torch.float32).t().contiguous()  # (G, N)
    return packed.contiguous(), scales, zeros.to(torch.uint8).t().contiguous()


def unpack_w4a16(packed: torch.Tensor) -> torch.Tensor:
    """Unsigned codes int32 ``[K, N]`` from ``packed`` int32 ``[K/8, N]``."""
    shifts = (4 * torch.arange(PACK_FACTOR, dtype=torch.int32, device=packed.device)).view(1, -1, 1)
    codes = (packed.to(torch.int32)[:, None, :] >> shifts) & 0xF  # (K/8, 8, N)
    return codes.reshape(-1, packed.shape[1])


def dequantize_w4a16(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """float32 ``W`` ``[K, N]``: ``(codes - zeros[g]) * scales[g]`` with ``g = k // group_size``."""
    codes = unpack_w4a16(packed).to(torch.float32)  # (K, N)
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=0)  # (K, N)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)  # (K, N)
    return (codes - z) * s
