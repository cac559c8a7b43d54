"""AWQ: activation-aware scaling and clipping before weight-only quantization.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (MLSys 2024). Weights that multiply large activations matter most; scaling
input channel ``j`` of ``W`` up by ``s_j`` (and the activation down by ``s_j``) shrinks
their relative rounding error. Two searches, both on a layer's calibration inputs ``X``:

- scales (the paper's ``auto_scale``): ``s = mean|x|^α``, or the "duo" form of llm-awq,
  AutoAWQ and ModelOpt's ``awq_lite``, ``s = mean|x|^α / mean|ŵ|^(1-α)`` (``ŵ``: ``|W|``
  over its group's max, averaged over output rows), for ``α`` on a grid over [0, 1];
  the candidate with the smallest output error of the quantized layer(s) wins. ``s = 1``
  (plain RTN) is always a candidate, so on the calibration set the search never does
  worse than RTN.
- clipping (the paper's ``auto_clip``): per output row and group, the quantization range
  ``max|w|`` is shrunk by a ratio in ``[0.5, 1]`` chosen to minimise that group's share
  of the output error. The per-group choices ignore the cross-group terms, so a row
  whose total error they made worse keeps its full range: clipping never increases any
  output row's calibration error.

Errors are computed from the Gram matrix ``G = XᵀX`` (``||XWᵀ - XŴᵀ||² = tr(D G Dᵀ)``
with ``D = W - Ŵ``), so every calibration row counts and no rows are held.

Fold the scales with ``smoothquant.fold_input_scale_`` (same convention: activation
``/ s``, weight ``· s``) or keep them as the layer's input divisor, then quantize
``W · s`` with RTN under the searched clipping ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from compressor.kernels.int4_format import fake_quantize_rtn

DEFAULT_GRID = 20  # α in {0, 1/20, ..., 1}
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * k, 2) for k in range(11))  # 1.0 ... 0.5


class InputStats:
    """Running ``XᵀX`` (fp32, in x in) and ``Σ|x|`` (in,) of a layer's inputs."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.gram.device, torch.float32)  # (n, in)
        self.gram.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(dim=0)
        self.rows += x.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


def input_stats(x: torch.Tensor) -> InputStats:
    """``InputStats`` of inputs ``x`` (..., in) in one call."""
    st = InputStats(x.shape[-1], x.device)
    st.add(x)
    return st


def row_output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per output row ``||X(w - ŵ)||²`` = ``(d G dᵀ)`` from the Gram matrix; shape (out,)."""
    d = (w - w_hat).to(gram.dtype)  # (out, in)
    return ((d @ gram) * d).sum(dim=1)


def weight_magnitude(weights: Sequence[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel mean of ``|w| / max|w in its group|`` over every output row of
    ``weights`` (the weight term of duo scaling); shape (in,)."""
    w = torch.cat([x.detach().float() for x in weights])  # (sum out, in)
    gs = group_size or w.shape[1]
    g = w.abs().reshape(w.shape[0], -1, gs)  # (out, G, gs)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return g.reshape(w.shape).mean(dim=0)


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``x_mean^α`` (or ``x_mean^α / w_mean^(1-α)`` for duo scaling), centred on 1 (in,)."""
    s = x_mean.clamp(min=1e-8).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.clamp(min=1e-8).pow(1.0 - alpha)
    s = s.clamp(min=1e-4, max=1e4)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True)
class AwqScaleSearch:
    """The chosen scales (in,), how they were made, and the error of every candidate."""

    scales: torch.Tensor
    alpha: float
    duo: bool  # divided by the weight term too
    error: float  # relative output error with ``scales`` (sum over the layers)
    rtn_error: float  # the same with no scaling
    errors: dict[str, float] = field(default_factory=dict)  # "x^0.35" / "x^0.35/w^0.65" -> error

    @property
    def is_identity(self) -> bool:
        return self.alpha == 0.0 and not self.duo


def _scaled_error(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    refs: Sequence[float],
    s: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
) -> float:
    """Σ over layers of ``||XWᵀ - (X/s) Q(W·s)ᵀ||² / ||XWᵀ||²``."""
    total = 0.0
    for w, ref in zip(weights, refs):
        w_hat = fake_quantize_rtn(w * s[None, :], bits, group_size, symmetric) / s[None, :]
        total += float(row_output_error(w, w_hat, gram).sum()) / ref
    return total


@torch.no_grad()
def awq_search_scales_from_stats(
    stats: InputStats,
    weights: Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    grid: int = DEFAULT_GRID,
    duo: bool = True,
) -> AwqScaleSearch:
    """Scales ``s`` (in,) for the linears ``weights`` (out_k, in) that all read the input
    whose statistics are ``stats``; ``duo`` adds the weight-normalised candidates."""
    gram = stats.gram
    ws = [w.detach().float().to(gram.device) for w in weights]
    refs = [max(float(((w @ gram) * w).sum()), 1e-12) for w in ws]
    x_mean = stats.abs_mean.to(gram.device)
    w_mean = weight_magnitude(ws, group_size) if duo else None
    ones = torch.ones_like(x_mean)
    rtn = _scaled_error(ws, gram, refs, ones, bits, group_size, symmetric)
    errors = {"x^0": rtn}
    best = (rtn, 0.0, False, ones)
    for k in range(1, grid + 1):
        alpha = k / grid
        forms = [(False, f"x^{alpha:g}")]
        if w_mean is not None:
            forms.append((True, f"x^{alpha:g}/w^{1 - alpha:g}"))
        for is_duo, label in forms:
            if is_duo and k == grid:
                continue  # α = 1: the weight term vanishes, same as the plain form
            s = awq_scales(x_mean, w_mean if is_duo else None, alpha)
            err = _scaled_error(ws, gram, refs, s, bits, group_size, symmetric)
            errors[label] = err
            if err < best[0]:
                best = (err, alpha, is_duo, s)
    if w_mean is not None:  # α = 0 of the duo form: weights only
        s = awq_scales(x_mean, w_mean, 0.0)
        errors["w^-1"] = err = _scaled_error(ws, gram, refs, s, bits, group_size, symmetric)
        if err < best[0]:
            best = (err, 0.0, True, s)
    return AwqScaleSearch(best[3], best[1], best[2], best[0], rtn, errors)


@torch.no_grad()
def awq_search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    grid: int = DEFAULT_GRID,
    duo: bool = True,
) -> AwqScaleSearch:
    """``awq_search_scales_from_stats`` on activations ``x`` (..., in)."""
    return awq_search_scales_from_stats(input_stats(x), weights, bits, group_size, symmetric, grid, duo)


@torch.no_grad()
def awq_search_clip(
    w: torch.Tensor,
    gram: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    ratios: Sequence[float] = CLIP_RATIOS,
) -> torch.Tensor:
    """Clipping ratio per (output row, group) of ``w`` (out, in), shape (out, n_groups), for
    a layer whose (already scaled) inputs have Gram matrix ``gram`` (in, in)."""
    w = w.detach().float().to(gram.device)
    out_f, in_f = w.shape
    gs = group_size or in_f
    n_groups = in_f // gs
    idx = torch.arange(n_groups, device=w.device)
    # the diagonal blocks of G: group g's inputs alone, (G, gs, gs)
    blocks = gram.reshape(n_groups, gs, n_groups, gs)[idx, :, idx, :]
    best_err = torch.full((out_f, n_groups), float("inf"), device=w.device)
    best = torch.ones(out_f, n_groups, device=w.device)
    for r in sorted(set(ratios) | {1.0}, reverse=True):
        d = (w - fake_quantize_rtn(w, bits, group_size, symmetric, r)).reshape(out_f, n_groups, gs)
        dg = d.transpose(0, 1)  # (G, out, gs)
        err = (torch.bmm(dg, blocks) * dg).sum(-1).t()  # (out, G): ||X_g d_og||²
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    # per row, the cross-group terms decide: keep the full range where clipping lost
    g64 = gram.double()
    clipped = row_output_error(w, fake_quantize_rtn(w, bits, group_size, symmetric, best), g64)
    plain = row_output_error(w, fake_quantize_rtn(w, bits, group_size, symmetric), g64)
    best[clipped > plain] = 1.0
    return best


@torch.no_grad()
def awq_output_error(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scales: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    clip_ratios: Sequence[torch.Tensor | float] | None = None,
) -> float:
    """Sum over linears of ``||XWᵀ - (X/s) Q(W·s)ᵀ||² / ||XWᵀ||²`` (relative), computed
    on the activations ``x`` themselves (the reference the searches are checked against)."""
    x = x.reshape(-1, x.shape[-1]).float()
    total = 0.0
    for k, w in enumerate(weights):
        w = w.float()
        ref = x @ w.t()
        clip = 1.0 if clip_ratios is None else clip_ratios[k]
        wq = fake_quantize_rtn(w * scales[None, :], bits, group_size, symmetric, clip) / scales[None, :]
        total += float((ref - x @ wq.t()).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    return total
