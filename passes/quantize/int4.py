"""The int4 path of `quantize`: weight-only group-wise int4 (W4A16) into ``Int4Linear``.

The algorithms (RTN, GPTQ, AWQ) are in ``compressor.passes.quantize.weight_only``; this
module runs the one the config names on the selected layers and says how each was
quantized.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from compressor.passes.quantize.config import Int4Config
from compressor.passes.quantize.weight_only import quantize_int4_
from compressor.pipeline import PassContext, PassOutput


def run_int4(model: nn.Module, cfg: Int4Config, ctx: PassContext, names: Sequence[str]) -> PassOutput:
    """Replace ``names`` by Int4Linear in place; the details name each layer's algorithm."""
    decisions = quantize_int4_(
        model,
        names,
        cfg.int4_algorithm,
        cfg.group_size,
        cfg.symmetric,
        ctx.data.calibration[: cfg.calibration_batches],
        ctx.adapter.forward,
        ctx.adapter.smooth_groups(model),
        awq_explicit_scales=cfg.awq_explicit_scales,
        awq_clip=cfg.awq_clip,
    )
    if cfg.int4_activations == "int8":
        for n in names:
            model.get_submodule(n).act_int8 = True  # type: ignore[assignment]
    details = {
        "quantized_layers": len(names),
        "int4": {
            "algorithm": cfg.int4_algorithm,
            "group_size": cfg.group_size,
            "activations": cfg.int4_activations,
        },  # fmt: skip
        "per_layer": {n: {"precision": "int4", "why": how} for n, how in decisions.items()},
    }
    return PassOutput(model, details)
