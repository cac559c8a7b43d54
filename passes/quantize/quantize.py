"""`quantize`: INT8 W8A8 with optional SmoothQuant and sensitivity-based mixed precision.

Methods:
- weights: symmetric int8 per output channel (``compressor.kernels.int8_linear``);
- activations: quantized on the fly, per token (GPU engines) or per tensor as ONNX
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
  when not given;
- mixed precision (``compressor.passes.quantize.mixed_precision``): each layer's sensitivity is
  the fidelity lost when only that layer is quantized; the most sensitive layers stay
  in float until the calibration mean cosine vs the teacher is within
  ``fidelity_budget`` of 1 (or reaches ``target_mean_cosine``) or ``max_float_layers``
  are kept. The decision for every layer, and why, is recorded in the manifest.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter, SmoothGroup
from compressor.config import option
from compressor.distill.config import RecoverConfig
from compressor.errors import DataError, PassError, PlanError, RecipeError
from compressor.kernels.fp8_linear import Fp8Linear
from compressor.kernels.int4_linear import Int4Linear
from compressor.kernels.int8_linear import Int8Linear, static_input_scale
from compressor.modules import get_linear, select_modules, set_module
from compressor.passes.quantize.mixed_precision import FidelityTarget, budget_target, plan_mixed_precision
from compressor.passes.quantize.smoothquant import fold_input_scale_, smoothquant_scales
from compressor.pipeline import Pass, PassContext, ensure_finite, register_pass
from compressor.targets import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeConfig:
    method: Literal["int8", "fp8", "int4"] = option(
        "int8",
        help="int8 = W8A8 (int8 weights and activations); fp8 = E4M3 weights and activations (h100 only); "
        "int4 = weight-only group-wise 4-bit (W4A16; int4_algorithm picks RTN, GPTQ or AWQ)",
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
    fp8_weights: Literal["per_channel", "per_tensor"] = option(
        "per_channel", help="fp8: one weight scale per output channel or per tensor"
    )
    targets: tuple[str, ...] = option(
        ("*",), help="module-name patterns of the Linear layers to quantize", patterns=True
    )
    ignore: tuple[str, ...] = option((), help="module-name patterns to leave in float", patterns=True)
    activations: Literal["auto", "dynamic_per_token", "dynamic_per_tensor", "static_per_tensor"] = option(
        "auto",
        help="activation scales: per token (GPU kernels) or per tensor (ONNX Runtime); auto picks by target; "
        "static_per_tensor = one scale per layer calibrated on the calibration data (TensorRT Q/DQ)",
    )
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
    calibration_batches: int = option(
        4, help="calibration batches used for statistics and sensitivity", ge=1, le=10_000
    )
    recover: RecoverConfig | None = option(
        None, help="distill against the original model right after this pass (steps, lr, loss)"
    )

    def validate(self, path: str) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"{path}.alpha: {self.alpha} is not in [0, 1]")
        if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid) or not self.alpha_grid:
            raise RecipeError(f"{path}.alpha_grid: every alpha must be in [0, 1]")
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
        if self.calibration_batches < 1:
            raise RecipeError(f"{path}.calibration_batches: must be at least 1")
        if self.group_size not in (32, 64, 128):
            raise RecipeError(f"{path}.group_size: {self.group_size} is not one of 32, 64, 128")

    def fidelity_target(self, before: float = 1.0) -> FidelityTarget | None:
        """The calibration mean cosine mixed precision aims for, in the recipe's words; ``before``:
        that of the model the pass received (a budget is a drop from it)."""
        if self.fidelity_budget is not None:
            return budget_target(self.fidelity_budget, before)
        if self.target_mean_cosine is not None:
            return FidelityTarget(self.target_mean_cosine, f"target_mean_cosine {self.target_mean_cosine:g}")
        return None


# ---- math (no pipeline imports) ----------------------------------------------------------


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

    def hook(name: str):  # type: ignore[no-untyped-def]
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


# ---- the pass -----------------------------------------------------------------------------


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@register_pass
class QuantizePass(Pass):
    name = "quantize"
    description = (
        "INT8 W8A8 (SmoothQuant, mixed precision; dynamic or static activations), FP8 E4M3 (h100), "
        "or INT4 weight-only (RTN, GPTQ, AWQ)"
    )
    Config = QuantizeConfig

    def act_scheme(self, target: Target) -> str:
        if self.config.activations != "auto":
            return self.config.activations
        return "dynamic_per_tensor" if target.device == "cpu" else "dynamic_per_token"

    def check(self, model: nn.Module, target: Target, adapter: ModelAdapter) -> None:
        target.require_precision(self.config.method, "quantize.method")
        if self.config.method in ("fp8", "int4") and (
            self.config.smoothquant or self.config.max_float_layers
        ):
            raise PlanError(
                "quantize: smoothquant and max_float_layers (with fidelity_budget / target_mean_cosine) apply to "
                "method int8 only"
            )
        if self.config.method == "int4":
            for n in select_modules(model, self.config.targets, self.config.ignore, what="quantize"):
                k = get_linear(model, n).in_features
                if k % self.config.group_size:
                    raise PlanError(
                        f"quantize.group_size: {self.config.group_size} does not divide {n}'s "
                        f"{k} input features; choose a group size that does, or ignore the layer"
                    )
        if target.device == "cpu" and self.config.activations == "dynamic_per_token":
            raise PlanError(
                "quantize.activations: dynamic_per_token has no fast ONNX Runtime CPU kernel; "
                "use dynamic_per_tensor (or auto) for target cpu"
            )
        select_modules(model, self.config.targets, self.config.ignore, what="quantize")

    def requires(self, model: nn.Module, ctx: PassContext) -> None:
        if not ctx.data.calibration:
            raise DataError("quantize: no calibration data")

    def run(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        cfg = self.config
        if cfg.method == "fp8":
            return self._run_fp8(model, ctx)
        if cfg.method == "int4":
            return self._run_int4(model, ctx)
        names = select_modules(model, cfg.targets, cfg.ignore, what="quantize")
        scheme = self.act_scheme(ctx.target)
        adapter = ctx.adapter
        cal = ctx.data.calibration[: cfg.calibration_batches]
        groups = adapter.smooth_groups(model)
        with torch.no_grad():
            reference = torch.cat([adapter.forward(ctx.teacher, b) for b in cal])

        # Each calibration evaluation runs the whole model on the calibration batches: with
        # SmoothQuant's alpha search and mixed precision that is dozens of them (minutes on a CPU).
        searching = cfg.smoothquant and cfg.alpha is None
        evals = (len(cfg.alpha_grid) if searching else 0) + 1
        if cfg.max_float_layers > 0:
            evals += 2 + len(names) + cfg.max_float_layers  # at most: some may be skipped
        with ctx.progress_bar("quantize: calibration evals", evals, "eval") as bar:
            return self._run_int8(model, ctx, names, scheme, cal, groups, reference, bar)

    def _run_int8(self, model, ctx, names, scheme, cal, groups, reference, bar) -> nn.Module:  # type: ignore[no-untyped-def]
        cfg = self.config
        adapter = ctx.adapter

        def build(alpha: float | None, keep_float: Sequence[str]) -> nn.Module:
            m = copy.deepcopy(model)
            chosen = [n for n in names if n not in set(keep_float)]
            quantize_linears_(m, chosen, scheme, groups, stats, alpha, cfg.fold_only)
            return m.eval()

        @torch.no_grad()
        def fidelity(m: nn.Module) -> float:
            score = _mean_cosine(torch.cat([adapter.forward(m, b) for b in cal]), reference)
            bar.update(1)
            return score

        need_stats = cfg.smoothquant or scheme == "static_per_tensor"
        stats = activation_absmax(model, names, adapter.forward, cal) if need_stats else None
        alpha = cfg.alpha
        if cfg.smoothquant and alpha is None:
            scores = {a: fidelity(build(a, ())) for a in cfg.alpha_grid}
            alpha = max(scores, key=lambda a: scores[a])
            ctx.record("alpha_search", {f"{a:g}": round(s, 6) for a, s in scores.items()})
        if not cfg.smoothquant:
            alpha = None
        ctx.record("alpha", alpha)
        ctx.record("activation_scheme", scheme)

        keep: list[str] = []
        if cfg.max_float_layers > 0:
            keep = self._choose_float_layers(model, names, scheme, groups, stats, alpha, fidelity, ctx)
        quantized = build(alpha, keep)
        ctx.record("float_layers", keep)
        ctx.record("quantized_layers", len(names) - len(keep))
        ctx.record("calibration_mean_cosine", round(fidelity(quantized), 6))
        return quantized

    def _run_int4(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        """Weight-only int4 into Int4Linear (``compressor.passes.quantize.weight_only``)."""
        from compressor.passes.quantize.weight_only import quantize_int4_

        cfg = self.config
        names = select_modules(model, cfg.targets, cfg.ignore, what="quantize")
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
        ctx.record("quantized_layers", len(names))
        ctx.record("int4", {"algorithm": cfg.int4_algorithm, "group_size": cfg.group_size})
        ctx.record("per_layer", {n: {"precision": "int4", "why": how} for n, how in decisions.items()})
        return model

    def _run_fp8(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        """FP8 E4M3 weights (per channel or tensor) and dynamic per-tensor E4M3 activations."""
        names = select_modules(model, self.config.targets, self.config.ignore, what="quantize")
        for n in names:
            set_module(model, n, Fp8Linear.from_linear(get_linear(model, n), self.config.fp8_weights))
        ctx.record("quantized_layers", len(names))
        ctx.record("fp8_weights", self.config.fp8_weights)
        return model

    def _choose_float_layers(self, model, names, scheme, groups, stats, alpha, fidelity, ctx) -> list[str]:  # type: ignore[no-untyped-def]
        """Greedy mixed precision (``plan_mixed_precision``), recorded per layer with why."""
        cfg = self.config

        def fidelity_with_float(keep: Sequence[str]) -> float:
            m = copy.deepcopy(model)
            chosen = [x for x in names if x not in set(keep)]
            quantize_linears_(m, chosen, scheme, groups, stats, alpha, cfg.fold_only)
            return fidelity(m.eval())

        before = 1.0
        if cfg.fidelity_budget is not None:  # a budget is a drop from the model this pass received
            was_training = model.training
            before = fidelity(model.eval())
            model.train(was_training)
        target = cfg.fidelity_target(before)
        found = plan_mixed_precision(names, fidelity_with_float, cfg.max_float_layers, target)
        ctx.record("per_layer", found.per_layer)
        if target is not None:
            ctx.record(
                "mixed_precision",
                {
                    "target": target.label,
                    "target_mean_cosine": round(target.mean_cosine, 6),
                    "reached": found.reached,
                    "mean_cosine_by_float_layers": [round(c, 6) for c in found.trace],
                },
            )
            if not found.reached:
                log.warning(
                    "quantize: %d layer(s) kept in float (max_float_layers) and the calibration mean cosine "
                    "%.6f still misses %s",
                    len(found.keep_float),
                    found.mean_cosine,
                    target.label,
                )
        return list(found.keep_float)

    def ensures(self, model: nn.Module, ctx: PassContext) -> None:
        found = 0
        for n, m in model.named_modules():
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
                        raise PassError(
                            f"{n}: static activation scale {float(m.input_scale)} is not positive"
                        )
                if m.weight_mask is not None and (m.weight.detach()[m.weight_mask == 0] != 0).any():
                    raise PassError(f"{n}: a sparsity mask was not preserved through quantization")
        if found == 0:
            raise PassError("quantize: no layer was quantized")
