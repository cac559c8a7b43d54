"""Numeric helpers the accuracy tests share: an SQNR floor, not ``allclose``."""

from __future__ import annotations

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``ref``, in dB:
    ``10 log10(sum(ref²) / sum((ref - approx)²))``, computed in float64 (an exact match reads
    as about 300 dB rather than infinity)."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum().clamp(min=1e-30)
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
