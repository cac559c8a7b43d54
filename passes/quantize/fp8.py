"""The fp8 path of `quantize`: FP8 E4M3 weights and activations into ``Fp8Linear``.

Weights get one E4M3 scale per output channel or per tensor (``fp8_weights``). Activations
(``fp8_activations``) are scaled on the fly per row or per tensor (``compressor.kernels.fp8_linear``),
or by one scale per layer calibrated here: ``max|x| / 448`` over the calibration batches, as the
model receives them (``static_per_tensor``). The dynamic schemes are data-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from compressor.kernels.fp8_format import FP8_E4M3_MAX
from compressor.kernels.fp8_linear import Fp8Linear
from compressor.modules import get_linear, set_module
from compressor.passes.quantize.config import Fp8Config
from compressor.passes.quantize.int8_math import activation_absmax
from compressor.pipeline import PassContext, PassOutput


def run_fp8(model: nn.Module, cfg: Fp8Config, ctx: PassContext, names: Sequence[str]) -> PassOutput:
    """Replace ``names`` by Fp8Linear in place."""
    scales = {}
    if cfg.fp8_activations == "static_per_tensor":
        cal = ctx.data.calibration[: cfg.calibration_batches]
        stats = activation_absmax(model, names, ctx.adapter.forward, cal)  # NaN/inf refused there
        scales = {n: (stats[n].amax() / FP8_E4M3_MAX).clamp(min=1e-12).reshape(1) for n in names}
    for n in names:
        fp8 = Fp8Linear.from_linear(get_linear(model, n), cfg.fp8_weights, cfg.fp8_activations, scales.get(n))
        set_module(model, n, fp8)
    return PassOutput(
        model,
        {
            "quantized_layers": len(names),
            "fp8_weights": cfg.fp8_weights,
            "fp8_activations": cfg.fp8_activations,
        },
    )
