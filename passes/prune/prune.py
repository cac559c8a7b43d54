"""The ``prune`` pass: Minitron-style structured pruning that really shrinks tensors.

Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation"
(2024): score attention heads, FFN channels and whole layers by their activations on
calibration data (``passes/prune/importance.py``), keep the best units at one uniform width
per model (``passes/prune/structure.py`` does the surgery), and write the new widths into
the Hugging Face config so the result saves and reloads with ``from_pretrained``.

Widths are given per dimension as an integer count to keep or a fraction (0, 1] of
the original to keep. ``plan`` works out those widths and the Linear shapes they give
before anything runs (``passes/prune/plan.py``), so the passes after it judge the pruned
model. ``recover:`` distills against the original model right after the pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compressor.distill.losses import ORIGIN_LAYERS_ATTR, origin_layers
from compressor.errors import PassError, PlanError
from compressor.passes.prune.config import StructuredPruneConfig
from compressor.passes.prune.importance import (
    ImportanceScores,
    activation_importance,
    magnitude_importance,
    random_importance,
)
from compressor.passes.prune.plan import PlannedWidths, PrunePlan, plan_widths, planned_linears
from compressor.passes.prune.structure import (
    Anatomy,
    count_parameters,
    describe_model,
    drop_layers_,
    prune_ffn_,
    prune_heads_,
    select_heads_per_group,
)
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import PlanState

log = logging.getLogger(__name__)


@torch.no_grad()
def prune_structured_(anatomy: Anatomy, scores: ImportanceScores, plan: PrunePlan) -> dict[str, list]:
    """Shrink the model described by ``anatomy`` to ``plan``, keeping the highest scores.

    Returns what was kept: {"heads": [[...] per layer], "ffn": [[...]], "layers": [...]}
    (indices into the original model)."""
    kept: dict[str, list] = {}
    if plan.heads != anatomy.num_heads:
        keep = [
            select_heads_per_group(scores.heads[i], plan.heads, anatomy.num_kv_heads)
            for i in range(anatomy.num_layers)
        ]
        prune_heads_(anatomy, keep)
        kept["heads"] = [sorted(k.tolist()) for k in keep]
    if plan.ffn != anatomy.intermediate_size:
        keep = [torch.topk(scores.ffn[i], plan.ffn).indices for i in range(anatomy.num_layers)]
        prune_ffn_(anatomy, keep)
        kept["ffn"] = [sorted(k.tolist()) for k in keep]
    if plan.layers != anatomy.num_layers:
        layers = sorted(torch.topk(scores.layers, plan.layers).indices.tolist())
        drop_layers_(anatomy, layers)
        kept["layers"] = layers
    return kept


def record_origin_layers_(model: nn.Module, kept_layers: Sequence[int], layers_before: int) -> None:
    """Note on ``model`` which original layer each remaining one came from (composing with an
    earlier prune), so distillation matches every layer's hidden state to its own origin."""
    before = origin_layers(model)
    if before is None or len(before) != layers_before:
        before = list(range(layers_before))
    setattr(model, ORIGIN_LAYERS_ATTR, [before[k] for k in kept_layers])


def check_anatomy(anatomy: Anatomy) -> list[str]:
    """Mismatches between the config's widths and the tensors (empty when consistent)."""
    problems = []
    cfg, parts = anatomy.config, anatomy.parts
    if anatomy.num_layers != cfg.num_hidden_layers:
        problems.append(f"{anatomy.num_layers} layers but num_hidden_layers={cfg.num_hidden_layers}")
    q_rows = anatomy.num_heads * anatomy.head_dim
    kv_rows = anatomy.num_kv_heads * anatomy.head_dim
    for i in range(anatomy.num_layers):
        shapes = {
            parts.q: (anatomy.linear(i, parts.q).out_features, q_rows),
            parts.k: (anatomy.linear(i, parts.k).out_features, kv_rows),
            parts.v: (anatomy.linear(i, parts.v).out_features, kv_rows),
            parts.o: (anatomy.linear(i, parts.o).in_features, q_rows),
            parts.ffn_out: (anatomy.linear(i, parts.ffn_out).in_features, anatomy.intermediate_size),
        }
        for name in parts.ffn_in:
            shapes[name] = (anatomy.linear(i, name).out_features, anatomy.intermediate_size)
        for name, (got, want) in shapes.items():
            if got != want:
                problems.append(f"layer {i} {name}: width {got}, config says {want}")
    return problems


@register_pass
class StructuredPrunePass(Pass[StructuredPruneConfig]):
    name = "prune"
    description = (
        "Minitron-style structured pruning of heads, FFN channels and layers (really shrinks tensors)"
    )
    Config = StructuredPruneConfig

    def plan(self, state: PlanState) -> PlanState:
        """The widths this prune keeps, judged from those an earlier prune planned, and every
        Linear layer at its new shape (``passes/prune/plan.py``)."""
        try:
            anatomy = describe_model(state.model)
            before = PlannedWidths.of(anatomy, state.widths)
            plan = plan_widths(before, self.config)
        except ValueError as e:
            raise PlanError(f"prune: {e}") from None
        linears = planned_linears(state, anatomy, before, plan)
        return state.replace(linears=linears, widths=plan.as_widths())

    def _plan(self, model: nn.Module) -> tuple[Anatomy, PrunePlan]:
        """The widths for the model as handed at run time."""
        try:
            anatomy = describe_model(model)
            return anatomy, plan_widths(anatomy, self.config)
        except ValueError as e:
            raise PlanError(f"prune: {e}") from None

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        anatomy, plan = self._plan(model)
        cfg = self.config
        batches: Sequence = ctx.data.calibration[: cfg.calibration_batches]
        before = count_parameters(model)
        if cfg.importance == "activation" or cfg.layer_importance != "random":
            if not batches:
                raise PassError("prune: activation importance needs calibration data, and there is none")
            scores = activation_importance(model, anatomy, batches, ctx.adapter.forward, cfg.layer_importance)
        else:
            scores = random_importance(anatomy, ctx.seed)
        if cfg.importance == "magnitude":
            mag = magnitude_importance(anatomy)
            scores = ImportanceScores(mag.heads, mag.ffn, scores.layers)
        elif cfg.importance == "random":
            rnd = random_importance(anatomy, ctx.seed)
            scores = ImportanceScores(rnd.heads, rnd.ffn, scores.layers)
        layers_before = anatomy.num_layers
        kept = prune_structured_(anatomy, scores, plan)
        if "layers" in kept:
            record_origin_layers_(model, kept["layers"], layers_before)
        after = count_parameters(model)
        log.info("prune: %d -> %d parameters (%s)", before, after, plan)
        details: dict[str, Any] = {
            "kept": kept,
            "widths": plan.as_widths(),
            "parameters": {"before": before, "after": after},
        }
        return PassOutput(model, details)

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        anatomy = describe_model(out.model)
        problems = check_anatomy(anatomy)
        widths = out.details.get("widths")
        if widths is not None:
            plan = PrunePlan(**widths)
            got = PrunePlan(anatomy.num_heads, anatomy.intermediate_size, anatomy.num_layers)
            if got != plan:
                problems.append(f"widths {got} differ from the plan {plan}")
        if problems:
            raise PassError("prune: the config does not match the tensors: " + "; ".join(problems))
