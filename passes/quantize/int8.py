"""The int8 path of `quantize`: SmoothQuant's alpha search, mixed precision, W8A8 layers.

Every candidate model is built from the model the pass received (a deep copy per
candidate) and scored by its calibration mean cosine against the teacher: one score per
alpha of ``alpha_grid`` when SmoothQuant's alpha is calibrated (Xiao et al., 2023, pick the
alpha that keeps the output closest), then, with ``max_float_layers``, the sensitivity of
each layer and the greedy float choice (``compressor.passes.quantize.mixed_precision``).
Each score runs the whole model on the calibration batches, so the bar counts them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.adapters.base import Batch, SmoothGroup
from compressor.passes.quantize.config import Int8Config
from compressor.passes.quantize.int8_math import (
    activation_absmax,
    mean_cosine,
    output_rows,
    quantize_linears_,
)
from compressor.passes.quantize.mixed_precision import plan_mixed_precision
from compressor.pipeline import PassContext, PassOutput
from compressor.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class _Candidates:
    """What every candidate int8 model of one run is built from, and how it is scored."""

    model: nn.Module  # as the pass received it; never changed
    names: Sequence[str]
    scheme: str
    groups: Sequence[SmoothGroup]
    stats: dict[str, torch.Tensor] | None
    fold_only: bool
    forward: Callable[[nn.Module, Batch], torch.Tensor]
    batches: Sequence[Batch]
    reference: torch.Tensor  # the teacher's outputs on ``batches``
    bar: Progress

    def build(self, alpha: float | None, keep_float: Sequence[str]) -> nn.Module:
        """A copy of the model with every selected layer but ``keep_float`` in int8."""
        m = copy.deepcopy(self.model)
        chosen = [n for n in self.names if n not in set(keep_float)]
        quantize_linears_(m, chosen, self.scheme, self.groups, self.stats, alpha, self.fold_only)
        return m.eval()

    @torch.no_grad()
    def fidelity(self, m: nn.Module) -> float:
        """Calibration mean cosine of ``m`` against the teacher."""
        score = mean_cosine(output_rows([self.forward(m, b) for b in self.batches]), self.reference)
        self.bar.update(1)
        return score


def run_int8(
    model: nn.Module, cfg: Int8Config, ctx: PassContext, names: Sequence[str], scheme: str
) -> PassOutput:
    """Replace ``names`` by Int8Linear (activations ``scheme``); returns the new model and details."""
    adapter = ctx.adapter
    cal = ctx.data.calibration[: cfg.calibration_batches]
    with torch.no_grad():
        reference = output_rows([adapter.forward(ctx.teacher, b) for b in cal])
    need_stats = cfg.smoothquant or scheme == "static_per_tensor"
    stats = activation_absmax(model, names, adapter.forward, cal) if need_stats else None

    # Each calibration evaluation runs the whole model on the calibration batches: with
    # SmoothQuant's alpha search and mixed precision that is dozens of them (minutes on a CPU).
    searching = cfg.smoothquant and cfg.alpha is None
    evals = (len(cfg.alpha_grid) if searching else 0) + 1
    if cfg.max_float_layers > 0:
        evals += 2 + len(names) + cfg.max_float_layers  # at most: some may be skipped
    details: dict[str, Any] = {}
    with ctx.progress_bar("quantize: calibration evals", evals, "eval") as bar:
        cands = _Candidates(
            model, names, scheme, adapter.smooth_groups(model), stats, cfg.fold_only, adapter.forward, cal,
            reference, bar,
        )  # fmt: skip
        alpha = cfg.alpha
        if searching:
            scores = {a: cands.fidelity(cands.build(a, ())) for a in cfg.alpha_grid}
            alpha = max(scores, key=lambda a: scores[a])
            details["alpha_search"] = {f"{a:g}": round(s, 6) for a, s in scores.items()}
        if not cfg.smoothquant:
            alpha = None
        details["alpha"] = alpha
        details["activation_scheme"] = scheme
        keep: list[str] = []
        if cfg.max_float_layers > 0:
            keep = _choose_float_layers(cfg, cands, alpha, details)
        quantized = cands.build(alpha, keep)
        details["float_layers"] = keep
        details["quantized_layers"] = len(names) - len(keep)
        details["calibration_mean_cosine"] = round(cands.fidelity(quantized), 6)
    return PassOutput(quantized, details)


def _choose_float_layers(
    cfg: Int8Config, cands: _Candidates, alpha: float | None, details: dict[str, Any]
) -> list[str]:
    """Greedy mixed precision (``plan_mixed_precision``), each layer's decision and why into
    ``details``."""
    model = cands.model
    before = 1.0
    if cfg.fidelity_budget is not None:  # a budget is a drop from the model this pass received
        was_training = model.training
        before = cands.fidelity(model.eval())
        model.train(was_training)
    target = cfg.fidelity_target(before)
    found = plan_mixed_precision(
        cands.names, lambda keep: cands.fidelity(cands.build(alpha, keep)), cfg.max_float_layers, target
    )
    details["per_layer"] = found.per_layer
    if target is not None:
        details["mixed_precision"] = {
            "target": target.label,
            "target_mean_cosine": round(target.mean_cosine, 6),
            "reached": found.reached,
            "mean_cosine_by_float_layers": [round(c, 6) for c in found.trace],
        }
        if not found.reached:
            log.warning(
                "quantize: %d layer(s) kept in float (max_float_layers) and the calibration mean cosine "
                "%.6f still misses %s",
                len(found.keep_float),
                found.mean_cosine,
                target.label,
            )
    return list(found.keep_float)
