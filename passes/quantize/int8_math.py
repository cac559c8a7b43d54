"""W8A8 math: calibration statistics and the Int8Linear replacement, with SmoothQuant folding.

``activation_absmax`` collects the per-input-channel max |x| each Linear sees on the
calibration batches (what SmoothQuant's ``s = max|X|^α / max|W|^(1-α)`` and a static
per-tensor scale ``max|x| / 127`` are computed from); ``quantize_linears_`` replaces Linears
by ``Int8Linear``, folding each group's divisor into the norm that produces its input where
it can (``compressor.passes.quantize.smoothquant``). Nothing here imports the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from compressor.adapters.base import Batch, SmoothGroup
from compressor.errors import DataError
from compressor.kernels.int8_linear import Int8Linear, static_input_scale
from compressor.modules import get_linear, set_module
from compressor.passes.quantize.smoothquant import fold_input_scale_, smoothquant_scales


def output_rows(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model outputs of several batches as one matrix of rows (the last dimension): a decoder's
    ``[B, T, V]`` logits of batches padded to different lengths cannot be concatenated as they
    are, their rows can."""
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of ``a`` and ``b`` (float64)."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@torch.no_grad()
def activation_absmax(
    model: nn.Module,
    names: Sequence[str],
    run: Callable[[nn.Module, Batch], torch.Tensor],
    batches: Sequence[Batch],
) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by each named Linear over ``batches``."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            if not torch.isfinite(x).all():
                raise DataError(f"calibration activations entering {name} contain NaN or inf")
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], amax) if name in stats else amax

        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        for b in batches:
            run(model, b)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def quantize_linears_(
    model: nn.Module,
    names: Sequence[str],
    act_scheme: str,
    groups: Sequence[SmoothGroup],
    act_stats: dict[str, torch.Tensor] | None,
    alpha: float | None,
    fold_only: bool,
) -> None:
    """Replace each named Linear by an Int8Linear, smoothing per group when ``alpha`` is set.

    ``static_per_tensor`` takes each layer's scale from ``act_stats`` (per-channel max |x|):
    after a divisor ``s`` the input's max is ``max_c(amax_c / s_c)``, whether ``s`` stays an
    input scale of the layer or is folded into the producing norm."""
    static = act_scheme == "static_per_tensor"
    if static and act_stats is None:
        raise ValueError("static_per_tensor needs the calibration statistics (act_stats)")

    def input_scale(name: str, divisor: torch.Tensor | None) -> torch.Tensor | None:
        if not static or act_stats is None:
            return None
        amax = act_stats[name].float()
        if divisor is not None:
            amax = amax / divisor.float().clamp(min=1e-8)
        return static_input_scale(amax)

    chosen = set(names)
    for g in groups:
        members = [n for n in g.linears if n in chosen]
        if not members:
            continue
        smooth = None
        divisor = None  # what divides the layers' input, folded or not (for the static scale)
        # A group can only share a folded divisor when every reader of the activation is quantized.
        foldable = g.producer is not None and len(members) == len(g.linears)
        if alpha is not None and act_stats is not None and (foldable or not fold_only):
            linears = [get_linear(model, n) for n in members]
            smooth = smoothquant_scales(act_stats[members[0]], [lin.weight for lin in linears], alpha)
            divisor = smooth
            if foldable and g.producer is not None:
                # The divisor now lives in the norm and s in W: the layers see no input scale.
                fold_input_scale_(model.get_submodule(g.producer), linears, smooth)
                smooth = None
        for n in members:
            lin = get_linear(model, n)
            set_module(model, n, Int8Linear.from_linear(lin, act_scheme, smooth, input_scale(n, divisor)))
            chosen.discard(n)
    for n in chosen:  # layers no group mentions
        lin = get_linear(model, n)
        set_module(model, n, Int8Linear.from_linear(lin, act_scheme, None, input_scale(n, None)))
