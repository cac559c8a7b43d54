"""SmoothQuant scale math: migrate activation outliers into the weights.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models" (ICML 2023). For an activation ``X`` read by linears ``W₁..Wₖ``, the
per-input-channel divisor

    s_j = max|X_j|^α / max_k max_o |W_k[o, j]|^(1-α)

gives ``(X / s)(W · s)ᵀ = XWᵀ`` exactly while flattening the activation's outlier
channels, so both sides quantize well to int8. ``smoothquant_alpha_search`` picks
``α`` by the W8A8 output error on calibration inputs. ``fold_input_scale_`` applies a
divisor: the producing LayerNorm/RMSNorm/Linear divides its output by ``s`` and the
reading linears multiply their input columns by ``s`` (AWQ uses the same folding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def smoothquant_scales(
    act_absmax: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: float = 0.5,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The smoothing divisor ``s`` (in,) for activation channel maxima ``act_absmax`` (in,)
    and the weights (out_k, in) of every linear reading that activation."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)  # (in,)
    a = act_absmax.detach().float().clamp(min=eps)
    s = a.pow(alpha) / w_absmax.clamp(min=eps).pow(1.0 - alpha)
    # channels that never fire or have zero weights keep s = 1: nothing to migrate
    s = torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(min=eps)


def fake_quant_int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per-output-channel quantize-dequantize of a weight (out, in)."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def fake_quant_int8_activation(x: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Symmetric int8 dynamic quantize-dequantize of activations (..., in): one scale per
    tensor, or per token (row) when ``per_token``."""
    if per_token:
        scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    else:
        scale = x.abs().amax() / 127.0
    scale = scale.clamp(min=1e-12)
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


@torch.no_grad()
def w8a8_output_error(
    x: torch.Tensor, weights: Sequence[torch.Tensor], scales: torch.Tensor, per_token: bool = False
) -> float:
    """Sum over the linears of ``||XWᵀ - Q(X/s) Q(W·s)ᵀ||² / ||XWᵀ||²`` (relative)."""
    x = x.reshape(-1, x.shape[-1]).float()
    xq = fake_quant_int8_activation(x / scales, per_token)
    total = 0.0
    for w in weights:
        w = w.float()
        ref = x @ w.t()
        out = xq @ fake_quant_int8_per_channel(w * scales).t()
        total += float((ref - out).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    return total


@torch.no_grad()
def smoothquant_alpha_search(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    per_token: bool = False,
    act_absmax: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, dict[float, float]]:
    """Grid-search ``α``: returns (best α, its divisor ``s`` (in,), {α: W8A8 error}).

    ``x`` (n, in) are calibration inputs of the linears; ``act_absmax`` defaults to the
    per-channel absmax of ``x`` (pass the full-calibration statistic when ``x`` is a
    subsample).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    amax = x.abs().amax(dim=0) if act_absmax is None else act_absmax
    errors: dict[float, float] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in alphas:
        s = smoothquant_scales(amax, weights, alpha)
        err = w8a8_output_error(x, weights, s, per_token)
        errors[float(alpha)] = err
        if best is None or err < best[0]:
            best = (err, float(alpha), s)
    assert best is not None, "alphas must not be empty"
    return best[1], best[2], errors


@torch.no_grad()
def fold_input_scale_(producer: nn.Module | None, linears: Sequence[nn.Linear], scales: torch.Tensor) -> None:
    """Fold the divisor ``s`` in place: producer output ``/ s``, linear input columns ``· s``.

    ``producer`` is a norm with a ``weight`` (and optional ``bias``) of shape (in,), or a
    Linear whose output rows feed the linears (e.g. ``v_proj`` before ``o_proj``).
    With ``producer=None`` only the weights are scaled and the caller must divide the
    activation by ``s`` at run time (an explicit input scale).
    """
    s = scales.detach().float()
    if producer is not None:
        weight = getattr(producer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape[0] != s.shape[0]:
            raise ValueError(f"cannot fold a scale of size {s.shape[0]} into {type(producer).__name__}")
        shape = (-1,) + (1,) * (weight.dim() - 1)  # norm weight (in,) or linear weight (in, k)
        weight.div_(s.reshape(shape).to(weight.dtype))
        bias = getattr(producer, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))
