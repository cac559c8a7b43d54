"""The fp8 path of `quantize`: FP8 E4M3 weights and activations into ``Fp8Linear``.

Weights get one E4M3 scale per output channel or per tensor (``fp8_weights``); activations
are scaled per tensor on the fly (``compressor.kernels.fp8_linear``). Data-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from compressor.kernels.fp8_linear import Fp8Linear
from compressor.modules import get_linear, set_module
from compressor.passes.quantize.config import Fp8Config
from compressor.pipeline import PassOutput


def run_fp8(model: nn.Module, cfg: Fp8Config, names: Sequence[str]) -> PassOutput:
    """Replace ``names`` by Fp8Linear in place."""
    for n in names:
        set_module(model, n, Fp8Linear.from_linear(get_linear(model, n), cfg.fp8_weights))
    return PassOutput(model, {"quantized_layers": len(names), "fp8_weights": cfg.fp8_weights})
