"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023). Columns of a Linear weight are
quantized one at a time; the rounding error of each column, scaled by the Cholesky
factor of ``H⁻¹`` (``H = 2XᵀX`` of the calibration inputs), is spread over the columns
not yet quantized, in lazy blocks. Options: bits (4 or 8), group size, symmetric or
asymmetric, act-order (visit columns by decreasing ``diag H``).

The result is a ``QuantizedWeight`` in exactly the RTN format of ``kernels/int4_format.py``.
With act-order, group parameters are fixed up front from the original weight in the
original column order ("static groups"), so no ``g_idx`` permutation is needed at
inference and the format stays identical.
"""

from __future__ import annotations

import torch

from compressor.kernels.int4_format import (
    QuantizedWeight,
    compute_group_qparams,
    compute_qparams,
    qrange,
    quantize_with_qparams,
)
from compressor.passes.common.hessian import damped_inverse_cholesky


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) given ``hessian`` (in, in) of its inputs."""
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features={in_f}")
    gs = in_f if group_size is None else group_size
    if in_f % gs:
        raise ValueError(f"group_size={group_size} must divide in_features={in_f}")
    qrange(bits, symmetric)  # validates bits
    n_groups = in_f // gs
    w_all = weight.detach().clone().to(torch.float32)
    h = hessian.detach().to(w_all.device, torch.float32)

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        # static groups: fixed from the original weight, indexed by original column
        static_scales, static_zeros = compute_group_qparams(w_all, bits, group_size, symmetric)
    else:
        perm = torch.arange(in_f, device=w_all.device)
        blocksize = max(blocksize // gs, 1) * gs if gs <= blocksize else gs  # groups never straddle blocks
    w_all = w_all[:, perm]
    hinv, dead = damped_inverse_cholesky(h[perm][:, perm], percdamp)
    w_all[:, dead] = 0.0

    q_all = torch.zeros_like(w_all)  # integer codes, permuted order
    scales = torch.zeros(out_f, n_groups, dtype=torch.float32, device=w_all.device)
    zeros = torch.zeros_like(scales)
    col_group = perm // gs  # group of each permuted column

    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w_all[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(col_group[col])
            if act_order:
                scale, zero = static_scales[:, g], static_zeros[:, g]
            else:
                if col % gs == 0:
                    # parameters from the error-updated weights of this group
                    s, z = compute_qparams(w1[:, i : i + gs], bits, symmetric)
                    scales[:, g], zeros[:, g] = s, z
                scale, zero = scales[:, g], zeros[:, g]
            w = w1[:, i]
            q = quantize_with_qparams(w[:, None], scale, zero, bits, symmetric)[:, 0]
            q_all[:, col] = q
            deq = (q - zero) * scale
            err = (w - deq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w_all[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if act_order:
        scales, zeros = static_scales, static_zeros
    inv = torch.argsort(perm)
    q_all = q_all[:, inv]
    dtype = torch.int8 if symmetric else torch.uint8
    return QuantizedWeight(q_all.to(dtype), scales, zeros.to(dtype), bits, group_size, symmetric)
