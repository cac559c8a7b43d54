"""`quantize`: INT8 W8A8 with optional SmoothQuant and sensitivity-based mixed precision,
FP8 E4M3, or INT4 weight-only.

Methods (one config per scheme, ``compressor.passes.quantize.config``):
- int8 weights: symmetric int8 per output channel (``compressor.kernels.int8_linear``);
  activations quantized on the fly, per token (GPU engines) or per tensor as ONNX
  Runtime's ``DynamicQuantizeLinear`` (CPU), chosen by the target unless set; or
  ``static_per_tensor``: one scale per layer calibrated ahead of time (max |x| over the
  calibration batches / 127, after SmoothQuant's divisor), what TensorRT's explicit
  Q/DQ engines run (``compressor.exporters.onnx.onnx_qdq``);
- SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training
  Quantization for Large Language Models"): per input channel ``s = max|X|^α /
  max|W|^(1-α)``; ``X / s`` and ``W · s`` compute the same product with the activation
  outliers moved into the weights. Where a LayerNorm produces the activation the
  divisor is folded into its weight and bias (free at run time); elsewhere it stays an
  explicit input scale of the layer (one Mul at run time, which ``fold_only: true``
  avoids by smoothing only foldable groups). α is calibrated on the calibration data
  when not given (``compressor.passes.quantize.int8``);
- mixed precision (``compressor.passes.quantize.mixed_precision``): each layer's sensitivity is
  the fidelity lost when only that layer is quantized; the most sensitive layers stay
  in float until the calibration mean cosine vs the teacher is within
  ``fidelity_budget`` of 1 (or reaches ``target_mean_cosine``) or ``max_float_layers``
  are kept. The decision for every layer, and why, is recorded in the manifest;
- fp8 (``compressor.passes.quantize.fp8``): E4M3 weights, activations per token, per tensor or
  calibrated static;
- ``kv_cache: fp8`` (any method, decoder LMs on h100; ``compressor.passes.quantize.kv_cache``):
  an E4M3 key/value cache with per-layer K and V scales calibrated on the model as quantized;
- int4 (``compressor.passes.quantize.int4``): group-wise W4A16 by RTN, GPTQ or AWQ.

The plan gives every selected layer its form and the facts the exports read
(``QuantizePass.plan``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from compressor.errors import DataError, PassError, PlanError
from compressor.kernels.fp8_linear import Fp8Linear
from compressor.kernels.int4_linear import Int4Linear
from compressor.kernels.int8_linear import Int8Linear
from compressor.modules import select_modules
from compressor.passes.quantize.config import (
    Fp8Config,
    Int4Config,
    Int8Config,
    QuantizeConfig,
    quantize_config,
    quantize_from_dict,
)
from compressor.passes.quantize.fp8 import run_fp8
from compressor.passes.quantize.int4 import run_int4
from compressor.passes.quantize.int8 import run_int8
from compressor.passes.quantize.int8_math import activation_absmax
from compressor.passes.quantize.kv_cache import calibrate_kv_fp8_
from compressor.pipeline import Pass, PassContext, PassOutput, ensure_finite, register_pass
from compressor.planning import FLOAT, PlanState
from compressor.targets import Target

__all__ = [
    "Fp8Config",
    "Int4Config",
    "Int8Config",
    "QuantizeConfig",
    "QuantizePass",
    "activation_absmax",
    "quantize_config",
]


def act_scheme(config: Int8Config, target: Target) -> str:
    """The int8 activation scheme: the config's, or by target when it says ``auto``."""
    if config.activations != "auto":
        return config.activations
    return "dynamic_per_tensor" if target.device == "cpu" else "dynamic_per_token"


def layer_facts(config: QuantizeConfig, target: Target) -> dict[str, Any]:
    """What the plan says of every layer ``config`` quantizes (the exports read it)."""
    if isinstance(config, Int8Config):
        return {"activations": act_scheme(config, target), "explicit_smooth": config.explicit_smooth}
    if isinstance(config, Fp8Config):
        return {"weights": config.fp8_weights, "activations": config.fp8_activations}
    return {
        "symmetric": config.symmetric,
        "activations": config.int4_activations,
        "group_size": config.group_size,
        "algorithm": config.int4_algorithm,
        "explicit_smooth": config.explicit_smooth,
    }


@register_pass
class QuantizePass(Pass[QuantizeConfig]):
    name = "quantize"
    description = (
        "INT8 W8A8 (SmoothQuant, mixed precision; dynamic or static activations), FP8 E4M3 (h100), "
        "or INT4 weight-only (RTN, GPTQ, AWQ)"
    )
    Config = QuantizeConfig  # one config per scheme

    def __init__(self, config: QuantizeConfig | None = None) -> None:
        super().__init__(config if config is not None else Int8Config())

    @classmethod
    def config_from_dict(cls, data: Any, path: str) -> QuantizeConfig:
        """The config of the scheme the options name with ``method`` (int8 when none)."""
        return quantize_from_dict(data, path)

    def plan(self, state: PlanState) -> PlanState:
        cfg = self.config
        target = state.target
        target.require_precision(cfg.method, "quantize.method")
        # run() selects among the model's float Linears: a layer an earlier pass quantized is not one
        floats = state.replace(linears={n: lin for n, lin in state.linears.items() if lin.form == FLOAT})
        names = floats.select(cfg.targets, cfg.ignore, what="quantize")
        if isinstance(cfg, Int4Config):
            for n in names:
                k = state.linears[n].in_features
                if cfg.int4_activations == "int8" and target.device != "cpu":
                    raise PlanError(
                        f"{state.where}.int4_activations: int8 is ONNX Runtime's CPU int4 path (MatMulNBits "
                        f"accuracy_level 4); target {target.name} runs W4A16: set int4_activations: float"
                    )
                if k % cfg.group_size:
                    raise PlanError(
                        f"quantize.group_size: {cfg.group_size} does not divide {n}'s "
                        f"{k} input features; choose a group size that does, or ignore the layer"
                    )
        facts = layer_facts(cfg, target)
        state = state.with_linears(
            {
                n: dataclasses.replace(state.linears[n], form=cfg.method, facts=dict(facts), by=state.where)
                for n in names
            }
        )
        return plan_kv_cache(cfg, state)

    def requires(self, model: nn.Module, ctx: PassContext) -> None:
        if not ctx.data.calibration:
            raise DataError("quantize: no calibration data")

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        cfg = self.config
        names = select_modules(model, cfg.targets, cfg.ignore, what="quantize")
        if isinstance(cfg, Fp8Config):
            out = run_fp8(model, cfg, ctx, names)
        elif isinstance(cfg, Int4Config):
            out = run_int4(model, cfg, ctx, names)
        else:
            out = run_int8(model, cfg, ctx, names, act_scheme(cfg, ctx.target))
        if cfg.kv_cache == "fp8":  # on the model as quantized: its k_proj / v_proj make the keys
            cal = ctx.data.calibration[: cfg.calibration_batches]
            out = dataclasses.replace(
                out, details={**out.details, **calibrate_kv_fp8_(out.model, ctx.adapter.forward, cal)}
            )
        return out

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        found = 0
        for n, m in out.model.named_modules():
            if isinstance(m, Int4Linear):
                found += 1
                ensure_finite(n, m.scales, "int4 group scales")
                if int(m.zeros.max()) > 15:
                    raise PassError(f"{n}: int4 zero points exceed 15")
            if isinstance(m, Fp8Linear):
                found += 1
                ensure_finite(n, m.weight_scale, "fp8 weight scale")
            if isinstance(m, Int8Linear):
                found += 1
                _ensure_int8(n, m)
        if found == 0:
            raise PassError("quantize: no layer was quantized")


def plan_kv_cache(cfg: QuantizeConfig, state: PlanState) -> PlanState:
    """``kv_cache: fp8``: refused off h100, for models that are not decoder LMs, and twice."""
    if cfg.kv_cache == "none":
        return state
    state.target.require_precision("fp8", "quantize.kv_cache")
    if state.adapter.name != "hf-causal-lm":
        raise PlanError(
            f"{state.where}.kv_cache: fp8 quantizes a decoder LM's key/value cache; model.adapter is "
            f"{state.adapter.name}: set kv_cache: none"
        )
    if state.kv_cache is not None:
        raise PlanError(
            f"{state.where}.kv_cache: the KV cache is already {state.kv_cache} ({state.kv_cache_by}); set it once"
        )
    return state.replace(kv_cache=cfg.kv_cache, kv_cache_by=state.where)


def _ensure_int8(n: str, m: Int8Linear) -> None:
    """Finite, positive scales; a calibrated scale where static; a 2:4 mask kept."""
    ensure_finite(n, m.weight_scale, "weight scale")
    if (m.weight_scale <= 0).any():
        raise PassError(f"{n}: weight scale has non-positive entries")
    if m.smooth is not None:
        ensure_finite(n, m.smooth, "SmoothQuant divisor")
    if m.act_scheme == "static_per_tensor":
        if m.input_scale is None:
            raise PassError(f"{n}: static_per_tensor layer has no calibrated input_scale")
        ensure_finite(n, m.input_scale, "static activation scale")
        if float(m.input_scale) <= 0:
            raise PassError(f"{n}: static activation scale {float(m.input_scale)} is not positive")
    if m.weight_mask is not None and (m.weight.detach()[m.weight_mask == 0] != 0).any():
        raise PassError(f"{n}: a sparsity mask was not preserved through quantization")
