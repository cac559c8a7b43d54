"""Int4Linear: the runtime layer for group-wise int4 weights with 16-bit activations (W4A16).

Math. ``y = x @ W + b`` with ``W[k, n] = (c[k, n] - zeros[g, n]) * scales[g, n]``,
``g = k // group_size``, 4-bit unsigned codes ``c``: the GPTQ / AWQ / RTN weight format of
``compressor.kernels.int4_format`` packed for the W4A16 kernel (int32 ``[K/8, N]`` codes,
fp32 ``[K/group, N]`` scales, uint8 ``[K/group, N]`` zeros). Weights take 4 bits plus 5 bytes per group of
``group_size`` (scale and zero), about 4.3 bits a weight at group 128.

Paths. On CUDA with Triton installed (``HAS_TRITON``) the forward runs the Triton kernel
(``compressor::w4a16_linear``), which dequantizes in registers and never materialises the
float weight; split-K for decode shapes. Elsewhere (and without Triton) the forward is the
reference: dequantize to float, then ``F.linear``. ``use_kernel=True`` also sends CPU tensors to the kernel when
``TRITON_INTERPRET=1`` (Triton's interpreter), which is how CPU-only CI exercises the
kernel path. The layer is inference-only: no float master weight, buffers only.

ONNX. Under ``torch.onnx.export`` the layer lowers to ONNX Runtime's
``com.microsoft.MatMulNBits`` (4-bit block-wise weights, the op ORT's CPU and CUDA
int4 GEMMs run) carrying OUR codes, scales and zero points: ``B`` uint8
``[N, K/block, block/2]`` (two codes a byte, the lower-indexed one in the low nibble),
``scales`` ``[N · K/block]``, ``zero_points`` uint8 ``[N · ceil(K/block / 2)]`` packed the
same way along the blocks. The block is the group size, which ORT requires to be a
power of two of at least 16.

``act_int8`` (``quantize int4_activations: int8``, CPU): the input is also rounded to int8,
symmetric, one scale ``max|x| / 127`` per row and block of ``group_size`` input channels,
what ``MatMulNBits`` computes with ``accuracy_level`` 4 (int8 dot products on VNNI / AMX);
the torch path rounds the same way, so the export is checked against what it runs.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels.int4_format import (
    QuantizedWeight,
    dequantize_w4a16,
    pack_w4a16,
    quantize_rtn,
    unpack_w4a16,
)
from compressor.kernels.triton_support import HAS_TRITON, KERNELS_EXTRA

logger = logging.getLogger(__name__)

QUANT_METHODS: tuple[str, ...] = ("rtn",)


def matmulnbits_tensors(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B``, ``scales`` and ``zero_points`` of ``MatMulNBits`` from the W4A16 layout."""
    codes = unpack_w4a16(packed).t().to(torch.uint8)  # (N, K)
    n, k = codes.shape
    blocks = k // group_size
    pairs = codes.reshape(n, blocks, group_size // 2, 2)
    b = pairs[..., 0] | (pairs[..., 1] << 4)  # (N, blocks, group/2)
    z = zeros.t().to(torch.uint8)  # (N, blocks)
    if blocks % 2:
        z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)  # (N * ceil(blocks / 2),)
    return b.contiguous(), scales.t().contiguous().reshape(-1).float(), zp.contiguous()


class _Int4LinearOnnx(torch.autograd.Function):
    """Carries the ``MatMulNBits`` lowering through ``torch.onnx.export`` (TorchScript exporter)."""

    @staticmethod
    def forward(ctx, x, b, scales, zero_points, bias, k, n, block, accuracy):
        return x.new_zeros((*x.shape[:-1], n))  # shapes only: the math is Int4Linear.forward

    @staticmethod
    def symbolic(g, x, b, scales, zero_points, bias, k, n, block, accuracy):
        extra = {"accuracy_level_i": accuracy} if accuracy else {}
        y = g.op(
            "com.microsoft::MatMulNBits",
            x,
            b,
            scales,
            zero_points,
            K_i=k,
            N_i=n,
            bits_i=4,
            block_size_i=block,
            **extra,
        )
        if bias is not None and not (hasattr(bias, "node") and bias.node().mustBeNone()):
            y = g.op("Add", y, bias)
        return y


def fake_quant_blocks_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` rounded to symmetric int8 with one scale ``max|x| / 127`` per row and block of
    ``block`` channels of the last dimension (``MatMulNBits`` accuracy level 4)."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = (xb.detach().abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    q = torch.clamp(torch.round(xb / scale), -127, 127) * scale
    return (xb + (q - xb).detach()).reshape(x.shape)


class Int4Linear(nn.Module):
    """A W4A16 linear layer over packed int4 weights; see the module docstring."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    smooth: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        bias: bool = True,
        use_kernel: bool = False,
    ) -> None:
        super().__init__()
        if in_features % 8:
            raise ValueError(f"in_features={in_features} must be a multiple of 8 to pack int4 weights")
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group_size={group_size} must be positive and divide in_features={in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.use_kernel = use_kernel
        self.act_int8 = False  # round the input to int8 per block too (see the module docstring)
        n_groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float32))
        self.register_buffer("zeros", torch.full((n_groups, out_features), 8, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # AWQ's activation scale for a layer whose input has no norm to fold it into: the
        # input is divided by it (its inverse is already multiplied into the weights)
        self.register_buffer("smooth", None)

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        use_kernel: bool = False,
        smooth: torch.Tensor | None = None,
    ) -> Int4Linear:
        """Pack a 4-bit ``QuantizedWeight`` (from RTN, GPTQ or AWQ) and an optional bias [out];
        ``smooth`` [in] divides the input (AWQ scales that no norm absorbed)."""
        out_f, in_f = qw.q.shape
        group_size = qw.group_size if qw.group_size is not None else in_f
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != (out_features,) = {(out_f,)}")
        m = cls(in_f, out_f, group_size, bias is not None, use_kernel)
        packed, scales, zeros = pack_w4a16(qw)
        m.packed.copy_(packed)
        m.scales.copy_(scales)
        m.zeros.copy_(zeros)
        if bias is not None and m.bias is not None:
            m.bias.copy_(bias.detach().float())
        if smooth is not None:
            smooth = smooth.detach().float().reshape(-1)
            if smooth.numel() != in_f or not bool(torch.isfinite(smooth).all()) or bool((smooth <= 0).any()):
                raise ValueError(f"smooth must be {in_f} finite positive scales")
            m.smooth = smooth.clone()
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int | None = 128,
        method: str = "rtn",
        symmetric: bool = True,
        use_kernel: bool = False,
    ) -> Int4Linear:
        """Quantize ``linear`` to int4 groups of ``group_size`` input channels (None: one
        group per row). ``method`` ``"rtn"``; GPTQ and AWQ weights come in through
        ``from_quantized`` since they need calibration data."""
        if method not in QUANT_METHODS:
            raise ValueError(
                f"method {method!r} is not one of {', '.join(QUANT_METHODS)}; "
                "quantize with GPTQ/AWQ first and use Int4Linear.from_quantized"
            )
        w = linear.weight.detach().float()
        mask = getattr(linear, "weight_mask", None)
        if isinstance(mask, torch.Tensor):
            w = w * mask
        qw = quantize_rtn(w, bits=4, group_size=group_size, symmetric=symmetric)
        return cls.from_quantized(qw, linear.bias, use_kernel)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [out, in] the layer computes with (nn.Linear layout)."""
        return dequantize_w4a16(self.packed, self.scales, self.zeros, self.group_size).t()

    def _kernel_path(self, x: torch.Tensor) -> bool:
        if not HAS_TRITON:
            if x.is_cuda or self.use_kernel:
                logger.debug("Int4Linear: Triton is not installed (%s); torch reference", KERNELS_EXTRA)
            return False
        if x.is_cuda:
            return True
        if self.use_kernel and os.environ.get("TRITON_INTERPRET") != "1":
            logger.debug("Int4Linear: use_kernel without CUDA or TRITON_INTERPRET=1; torch reference")
            return False
        return self.use_kernel

    @torch.no_grad()
    def freeze_for_export_(self) -> None:
        """Store the ``MatMulNBits`` tensors as buffers so a trace carries them as initializers."""
        g = self.group_size
        if g < 16 or g & (g - 1):
            raise ValueError(
                f"Int4Linear: ONNX Runtime's MatMulNBits needs a power-of-two group of at least 16, got {g}"
            )
        b, scales, zp = matmulnbits_tensors(self.packed, self.scales, self.zeros, g)
        self.register_buffer("onnx_b", b)
        self.register_buffer("onnx_scales", scales)
        self.register_buffer("onnx_zero_points", zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, Int4Linear expects {self.in_features}")
        if self.smooth is not None:  # one Div at run time (in ONNX a Div by a constant)
            x = x / self.smooth.to(x.dtype)
        if torch.onnx.is_in_onnx_export():
            if getattr(self, "onnx_b", None) is None:
                raise RuntimeError("call freeze_for_export_() on Int4Linear before ONNX export")
            return _Int4LinearOnnx.apply(
                x,
                self.onnx_b,
                self.onnx_scales,
                self.onnx_zero_points,
                self.bias,
                self.in_features,
                self.out_features,
                self.group_size,
                4 if self.act_int8 else 0,
            )
        if self.act_int8:
            x = fake_quant_blocks_int8(x, self.group_size)
        if self._kernel_path(x):
            from compressor.kernels.w4a16 import w4a16_linear  # imports triton

            return w4a16_linear(x, self.packed, self.scales, self.zeros, self.group_size, self.bias)
        w = self.dequantized_weight().to(x.dtype)  # (N, K)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: packed codes, scales, zeros and bias."""
        n = 4 * self.packed.numel() + 4 * self.scales.numel() + self.zeros.numel()
        n += 0 if self.smooth is None else 4 * self.smooth.numel()
        return n + (0 if self.bias is None else 4 * self.bias.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, use_kernel={self.use_kernel}"
            + (", int8 activations" if self.act_int8 else "")
        )
