"""The `quantize` pass's options: one frozen config per scheme, built from shared option groups.

A recipe names the scheme with ``method`` (``int8`` when it says none); ``quantize_from_dict``
picks that scheme's config class, so an option of another scheme is refused naming the key
and the scheme that takes it (``passes[1].group_size: not an option of quantize method int8
(an option of method int4)``). The groups:

- ``QuantizeOptions`` (every scheme): ``method``, ``targets``, ``ignore``,
  ``calibration_batches``, ``recover``, ``kv_cache`` (an FP8 key/value cache,
  ``compressor.passes.quantize.kv_cache``);
- ``SmoothQuantOptions`` (int8): ``smoothquant``, ``alpha``, ``alpha_grid``, ``fold_only``;
- ``MixedPrecisionOptions`` (int8): ``max_float_layers``, ``fidelity_budget``,
  ``target_mean_cosine``.

``Int8Config`` adds ``activations``; ``Fp8Config`` adds ``fp8_weights`` and
``fp8_activations``; ``Int4Config`` adds the group-wise
options and the algorithm (RTN, GPTQ, AWQ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from compressor.config import from_dict, option, show, show_key
from compressor.distill.config import RecoverConfig
from compressor.errors import RecipeError
from compressor.passes.quantize.mixed_precision import FidelityTarget, budget_target

Activations = Literal["auto", "dynamic_per_token", "dynamic_per_tensor", "static_per_tensor"]


@dataclass(frozen=True)
class QuantizeOptions:
    """The options every scheme takes. ``method`` leads them; each scheme narrows it to its name."""

    method: str = option(
        "int8",
        help="int8 = W8A8 (int8 weights and activations); fp8 = E4M3 weights and activations (h100 only); "
        "int4 = weight-only group-wise 4-bit (W4A16; int4_algorithm picks RTN, GPTQ or AWQ)",
    )
    targets: tuple[str, ...] = option(
        ("*",), help="module-name patterns of the Linear layers to quantize", patterns=True
    )
    ignore: tuple[str, ...] = option((), help="module-name patterns to leave in float", patterns=True)
    calibration_batches: int = option(
        4, help="calibration batches used for statistics and sensitivity", ge=1, le=10_000
    )
    recover: RecoverConfig | None = option(
        None, help="distill against the original model right after this pass (steps, lr, loss)"
    )
    kv_cache: Literal["none", "fp8"] = option(
        "none",
        help="fp8 = an E4M3 key/value cache: one scale per layer for K and one for V, calibrated (max|k| / "
        "448 after RoPE) on the calibration data by the model as quantized; written as compressed-tensors' "
        "kv_cache_scheme for vLLM (decoder LMs, target h100)",
    )

    def check_common(self, path: str) -> None:
        if self.calibration_batches < 1:
            raise RecipeError(f"{path}.calibration_batches: must be at least 1")


@dataclass(frozen=True)
class SmoothQuantOptions:
    """SmoothQuant (Xiao et al., 2023): activation outliers migrated into the weights."""

    smoothquant: bool = option(False, help="migrate activation outliers into the weights (SmoothQuant)")
    alpha: float | None = option(
        None, help="SmoothQuant migration strength in [0, 1]; null = calibrate", ge=0.0, le=1.0
    )
    alpha_grid: tuple[float, ...] = option(
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        help="alphas tried when calibrating SmoothQuant",
        ge=0.0,
        le=1.0,
        max_items=101,
    )
    fold_only: bool = option(
        False, help="smooth only where the divisor folds into a norm (no run-time Mul; none in post-LN BERT)"
    )

    def check_smoothquant(self, path: str) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"{path}.alpha: {self.alpha} is not in [0, 1]")
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid) or not self.alpha_grid:
            raise RecipeError(f"{path}.alpha_grid: every alpha must be in [0, 1]")

    @property
    def explicit_smooth(self) -> bool:
        """SmoothQuant leaves a run-time input divisor where no norm takes it."""
        return self.smoothquant and not self.fold_only


@dataclass(frozen=True)
class MixedPrecisionOptions:
    """Sensitivity-based mixed precision (``compressor.passes.quantize.mixed_precision``)."""

    max_float_layers: int = option(0, help="at most this many of the most sensitive layers stay in float")
    fidelity_budget: float | None = option(
        None,
        help="int8 mixed precision: the drop in calibration mean cosine (vs the original model) this pass "
        "may cause, from the model it receives (0.003 on the original = mean cosine >= 0.997; after a "
        "prune at 0.95, >= 0.947); the most sensitive layers stay in float until it holds, at most "
        "max_float_layers of them",
    )
    target_mean_cosine: float | None = option(
        None,
        help="the same goal as an absolute calibration mean cosine (fidelity_budget 0.003 = target 0.997); "
        "set one of the two",
        ge=0.0,
        le=1.0,
    )

    def check_mixed_precision(self, path: str) -> None:
        if self.max_float_layers < 0:
            raise RecipeError(f"{path}.max_float_layers: must not be negative")
        if self.target_mean_cosine is not None and not 0.0 < self.target_mean_cosine <= 1.0:
            raise RecipeError(f"{path}.target_mean_cosine: {self.target_mean_cosine} is not in (0, 1]")
        if self.fidelity_budget is not None:
            if not 0.0 <= self.fidelity_budget < 1.0:
                raise RecipeError(
                    f"{path}.fidelity_budget: {self.fidelity_budget} is not in [0, 1) (the allowed drop in "
                    "mean cosine, e.g. 0.003)"
                )
            if self.target_mean_cosine is not None:
                raise RecipeError(
                    f"{path}.fidelity_budget: set either fidelity_budget or target_mean_cosine, not both "
                    f"(fidelity_budget {self.fidelity_budget:g} means target_mean_cosine "
                    f"{1 - self.fidelity_budget:.6g})"
                )
        if self.fidelity_target() is not None and self.max_float_layers == 0:
            key = "fidelity_budget" if self.fidelity_budget is not None else "target_mean_cosine"
            raise RecipeError(
                f"{path}.{key}: needs max_float_layers > 0 (how many sensitive layers may stay in float)"
            )

    def fidelity_target(self, before: float = 1.0) -> FidelityTarget | None:
        """The calibration mean cosine mixed precision aims for, in the recipe's words; ``before``:
        that of the model the pass received (a budget is a drop from it)."""
        if self.fidelity_budget is not None:
            return budget_target(self.fidelity_budget, before)
        if self.target_mean_cosine is not None:
            return FidelityTarget(self.target_mean_cosine, f"target_mean_cosine {self.target_mean_cosine:g}")
        return None


@dataclass(frozen=True)
class Int8Config(MixedPrecisionOptions, SmoothQuantOptions, QuantizeOptions):
    """INT8 W8A8: int8 weights per output channel, int8 activations (dynamic or calibrated)."""

    method: Literal["int8"] = option("int8", help="int8 = W8A8 (int8 weights and activations)")
    activations: Activations = option(
        "auto",
        help="activation scales: dynamic_per_token = one scale per row (GPU kernels; on the CPU batch-invariant, "
        "a sentence's output independent of its batch-mates; MiniLM measured 1.12x the per-tensor bundle's "
        "latency at 32x128 on an AVX2 host, benchmarks/results/minilm_cpu.md); dynamic_per_tensor = one scale over the whole batch (ONNX Runtime's fused "
        "DynamicQuantizeMatMul, not batch-invariant); auto: per tensor on cpu, per token on GPUs; "
        "static_per_tensor = one scale per layer calibrated on the calibration data (TensorRT Q/DQ)",
    )

    def validate(self, path: str) -> None:
        self.check_smoothquant(path)
        self.check_mixed_precision(path)
        self.check_common(path)


@dataclass(frozen=True)
class Fp8Config(QuantizeOptions):
    """FP8 E4M3 weights (per channel or per tensor) and E4M3 activations (dynamic or calibrated)."""

    method: Literal["fp8"] = option("fp8", help="fp8 = E4M3 weights and activations (h100 only)")
    fp8_weights: Literal["per_channel", "per_tensor"] = option(
        "per_channel", help="fp8: one weight scale per output channel or per tensor"
    )
    fp8_activations: Literal["dynamic_per_token", "dynamic_per_tensor", "static_per_tensor"] = option(
        "dynamic_per_token",
        help="fp8 activation scales: dynamic_per_token = one per row, on the fly (vLLM's FP8_DYNAMIC; a "
        "token's output independent of its batch-mates); dynamic_per_tensor = one over the whole input; "
        "static_per_tensor = one per layer, calibrated on the calibration data (vLLM's static FP8)",
    )

    def validate(self, path: str) -> None:
        self.check_common(path)


@dataclass(frozen=True)
class Int4Config(QuantizeOptions):
    """INT4 weight-only, group-wise (W4A16): RTN, GPTQ or AWQ."""

    method: Literal["int4"] = option(
        "int4", help="int4 = weight-only group-wise 4-bit (W4A16; int4_algorithm picks RTN, GPTQ or AWQ)"
    )
    int4_algorithm: Literal["rtn", "gptq", "awq"] = option(
        "gptq",
        help="int4: rtn (data-free), gptq (Hessian error feedback, block by block) or awq "
        "(activation-aware scales and clipping searched block by block; scales folded into pre-norms or "
        "kept as input divisors, then RTN)",
    )
    awq_explicit_scales: bool = option(
        True,
        help="int4 awq: layers whose input has no norm to fold the scales into divide their input at run "
        "time (one Div); false = plain RTN for them",
    )
    awq_clip: bool = option(
        True,
        help="int4 awq: also search a clipping ratio per output row and group (AWQ's auto_clip); "
        "never raises a row's calibration error",
    )
    group_size: int = option(128, help="int4: input channels per scale / zero point (32, 64 or 128)")
    symmetric: bool = option(True, help="int4: symmetric codes (zero point 8); keeps 2:4 zeros exact")
    int4_activations: Literal["float", "int8"] = option(
        "float",
        help="int4: float = W4A16; int8 = the input also rounded to int8 per row and group at run time "
        "(ONNX Runtime's MatMulNBits accuracy_level 4: int8 dot products; target cpu; measured 1.41x -> "
        "2.1x the float LM's decode speed, benchmarks/README.md)",
    )

    def validate(self, path: str) -> None:
        self.check_common(path)
        if self.group_size not in (32, 64, 128):
            raise RecipeError(f"{path}.group_size: {self.group_size} is not one of 32, 64, 128")

    @property
    def explicit_smooth(self) -> bool:
        """AWQ leaves a run-time input divisor on layers with no norm to fold its scales into."""
        return self.int4_algorithm == "awq" and self.awq_explicit_scales


QuantizeConfig = Int8Config | Fp8Config | Int4Config
"""A `quantize` pass's config: the config of its scheme (``method``)."""

SCHEMES: dict[str, type[Int8Config] | type[Fp8Config] | type[Int4Config]] = {
    "int8": Int8Config,
    "fp8": Fp8Config,
    "int4": Int4Config,
}


def _options(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _refuse_other_schemes(method: str, keys: list[str], path: str) -> None:
    """Refuse the first key ``method``'s config lacks that another scheme takes, naming both; a key
    no scheme takes is left to ``from_dict`` (``unknown key; allowed keys here: ...``)."""
    own = set(_options(SCHEMES[method]))
    for key in keys:
        if key in own:
            continue
        others = [m for m, c in SCHEMES.items() if m != method and key in _options(c)]
        if others:
            raise RecipeError(
                f"{path}.{show_key(key)}: not an option of quantize method {method} (an option of method "
                f"{' and '.join(others)}; set method: {others[0]} or drop it)"
            )
        return


def _method_of(data: Mapping[str, Any], path: str) -> str:
    method = data.get("method", "int8")
    if not isinstance(method, str) or method not in SCHEMES:
        raise RecipeError(f"{path}.method: {show(method)} is not one of {', '.join(SCHEMES)}")
    return method


def quantize_from_dict(data: Any, path: str) -> QuantizeConfig:
    """The config of the scheme ``data`` names with ``method`` (int8 when none), from a recipe
    entry's options; errors name ``path.key``."""
    if not isinstance(data, Mapping):
        return from_dict(Int8Config, data, path)  # null = every default; anything else: its error
    method = _method_of(data, path)
    _refuse_other_schemes(method, list(data), path)
    return from_dict(SCHEMES[method], data, path)


def quantize_config(method: str = "int8", **options: Any) -> QuantizeConfig:
    """The config of scheme ``method`` with ``options`` (as a dataclass is built: not validated;
    ``quantize_from_dict`` validates recipe data). An option of another scheme is a TypeError."""
    if method not in SCHEMES:
        raise TypeError(f"quantize method {method!r} is not one of {', '.join(SCHEMES)}")
    try:
        _refuse_other_schemes(method, list(options), "quantize")
    except RecipeError as e:
        raise TypeError(str(e)) from None
    return SCHEMES[method](**options)
