"""Sensitivity-based mixed precision: which layers stay in float, and why.

A layer's sensitivity is the calibration fidelity lost when only that layer is
quantized (the rest in float), the one-layer-at-a-time measure of sensitivity lists
(e.g. Dong et al., "HAWQ", 2019, rank layers by it before assigning precisions). The
most sensitive layers stay in float, one at a time, re-measuring the fidelity of the
model with every other layer quantized, until it reaches the target (a recipe's
``fidelity_budget``: the drop this pass may cause, below the fidelity of the model as the
pass received it, so after pruning the budget is not spent on what pruning lost; or an
absolute ``target_mean_cosine``) or ``max_float_layers`` are kept. Without a target the
``max_float_layers`` most sensitive layers stay in float.

The plan says, for every layer, its precision, its sensitivity and rank, and why; a
target that ``max_float_layers`` could not reach is reported as missed (``reached``
false), not hidden. Nothing here imports the pipeline: the caller measures fidelity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FidelityTarget:
    """The calibration mean cosine to reach, and the recipe words that asked for it."""

    mean_cosine: float
    label: str  # "fidelity_budget 0.003 (mean cosine >= 0.997)"


def budget_target(budget: float, before: float = 1.0) -> FidelityTarget:
    """``fidelity_budget``: at most ``budget`` below ``before``, the calibration mean cosine of
    the model as the pass received it (1 for the original model)."""
    goal = before - budget
    where = "" if before > 1.0 - 1e-6 else f", {before:.6g} before this pass"
    return FidelityTarget(goal, f"fidelity_budget {budget:g} (mean cosine >= {goal:.6g}{where})")


@dataclass(frozen=True)
class MixedPrecisionPlan:
    keep_float: tuple[str, ...]
    per_layer: dict[str, dict[str, Any]]  # layer -> precision, why (and sensitivity, rank)
    mean_cosine: float | None  # calibration mean cosine of the plan (None: not measured)
    reached: bool | None  # the target was met (None: no target)
    trace: list[float] = field(default_factory=list)  # mean cosine with 0, 1, 2, ... layers in float


def plan_mixed_precision(
    names: Sequence[str],
    fidelity_with_float: Callable[[Sequence[str]], float],
    max_float_layers: int,
    target: FidelityTarget | None,
    quantized: str = "int8",
    float_precision: str = "fp32",
) -> MixedPrecisionPlan:
    """Greedy mixed precision over ``names``. ``fidelity_with_float(keep)`` is the calibration
    mean cosine vs the teacher of the model with the layers ``keep`` in float and every
    other layer of ``names`` quantized."""
    trace: list[float] = []
    current: float | None = None
    if target is not None:
        current = fidelity_with_float(())
        trace.append(current)
        if current >= target.mean_cosine:
            why = (
                f"with every layer {quantized} the calibration mean cosine {current:.6f} meets {target.label}"
            )
            return MixedPrecisionPlan(
                (), {n: {"precision": quantized, "why": why} for n in names}, current, True, trace
            )
    # ``n`` alone compressed: every other layer in float
    sensitivity = {n: 1.0 - fidelity_with_float([m for m in names if m != n]) for n in names}
    order = sorted(names, key=lambda n: -sensitivity[n])
    rank = {n: i + 1 for i, n in enumerate(order)}
    keep: list[str] = []
    for n in order[:max_float_layers]:
        if target is not None and current is not None and current >= target.mean_cosine:
            break
        keep.append(n)
        if target is not None:
            current = fidelity_with_float(keep)
            trace.append(current)
    reached = None if target is None or current is None else current >= target.mean_cosine
    per_layer: dict[str, dict[str, Any]] = {}
    for n in names:
        alone = f"{quantized} alone it costs {sensitivity[n]:.2e} calibration mean cosine (rank {rank[n]})"
        if n in keep:
            goal = (
                f"toward {target.label}" if target is not None else f"the {max_float_layers} most sensitive"
            )
            why = f"kept in {float_precision}: {alone}; {goal}"
        elif target is None:
            why = f"{quantized}: {alone}; less sensitive than the {len(keep)} kept in {float_precision}"
        elif reached:
            why = (
                f"{quantized}: {alone}; with {len(keep)} layer(s) in {float_precision} the calibration mean "
                f"cosine {current:.6f} meets {target.label}"
            )
        else:
            why = (
                f"{quantized}: {alone}; max_float_layers ({max_float_layers}) spent and the calibration mean "
                f"cosine {current:.6f} still misses {target.label}"
            )
        per_layer[n] = {
            "precision": float_precision if n in keep else quantized,
            "sensitivity": round(sensitivity[n], 7),
            "rank": rank[n],
            "why": why,
        }
    return MixedPrecisionPlan(tuple(keep), per_layer, current, reached, trace)
