"""AWQ: activation-aware per-input-channel scaling before weight-only quantization.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (MLSys 2024). Weights that multiply large activations matter most; scaling
input channel ``j`` of ``W`` up by ``s_j`` (and the activation down by ``s_j``) shrinks
their relative rounding error. AWQ searches ``s = mean|X|^α`` (normalised) over a grid
of ``α`` in [0, 1), picking the one with the smallest output error of the quantized
layer(s) on calibration inputs. ``α = 0`` is plain RTN, so on the calibration set the
search never does worse than RTN.

Fold the returned scales with ``smoothquant.fold_input_scale_`` (same convention:
activation ``/ s``, weight ``· s``) and then quantize the scaled weight with RTN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressor.passes.int4 import fake_quantize_rtn

DEFAULT_GRID = 20


@torch.no_grad()
def awq_output_error(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scales: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
) -> float:
    """Sum over linears of ``||XWᵀ - (X/s) Q(W·s)ᵀ||² / ||XWᵀ||²`` (relative)."""
    x = x.reshape(-1, x.shape[-1]).float()
    total = 0.0
    for w in weights:
        w = w.float()
        ref = x @ w.t()
        wq = fake_quantize_rtn(w * scales[None, :], bits, group_size, symmetric) / scales[None, :]
        total += float((ref - x @ wq.t()).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    return total


@torch.no_grad()
def awq_search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    grid: int = DEFAULT_GRID,
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """Per-input-channel scales ``s`` (in,) for linears ``weights`` (out_k, in) that read
    the activations ``x`` (n, in). Returns (s, best α, {α: relative output error})."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_mean = x.abs().mean(dim=0).clamp(min=1e-8)  # (in,)
    errors: dict[float, float] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # keep scales centred around 1
        err = awq_output_error(x, weights, s, bits, group_size, symmetric)
        errors[alpha] = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None, "grid must be at least 1"
    return best[2], best[1], errors
