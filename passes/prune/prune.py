"""The ``prune`` pass: Minitron-style structured pruning that really shrinks tensors.

Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation"
(2024): score attention heads, FFN channels and whole layers by their activations on
calibration data (``passes/prune/importance.py``), keep the best units at one uniform width
per model (``passes/prune/structure.py`` does the surgery), and write the new widths into
the Hugging Face config so the result saves and reloads with ``from_pretrained``.

Widths are given per dimension as an integer count to keep or a fraction (0, 1] of
the original to keep. Recovery by distillation (``recover:``) is not wired yet: the
distillation engine is not on main; run a ``distill`` pass after ``prune`` meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.config import option
from compressor.distill.config import RecoverConfig
from compressor.distill.losses import ORIGIN_LAYERS_ATTR, origin_layers
from compressor.errors import PassError, PlanError, RecipeError
from compressor.passes.prune.importance import (
    ImportanceScores,
    LayerMethod,
    UnitMethod,
    activation_importance,
    magnitude_importance,
    random_importance,
)
from compressor.passes.prune.structure import (
    Anatomy,
    count_parameters,
    describe_model,
    drop_layers_,
    prune_ffn_,
    prune_heads_,
    select_heads_per_group,
)
from compressor.pipeline import Pass, PassContext, register_pass

if TYPE_CHECKING:
    from compressor.adapters.base import ModelAdapter
    from compressor.targets import Target

log = logging.getLogger(__name__)

Width = int | float | None


def resolve_width(spec: Width, current: int, what: str, multiple_of: int = 1) -> int:
    """The kept count for ``spec`` (int count, float fraction kept, None = unchanged).

    Fractions round to the nearest multiple of ``multiple_of`` (at least one multiple).
    Raises ValueError naming ``what`` for an impossible width.
    """
    if spec is None:
        return current
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"{what}: fraction {spec} must be in (0, 1]")
        n = max(round(current * spec / multiple_of), 1) * multiple_of
    else:
        n = spec
    if n < 1:
        raise ValueError(f"{what}: must keep at least 1, got {n}")
    if n > current:
        raise ValueError(f"{what}: cannot keep {n}, the model has only {current}")
    if n % multiple_of:
        raise ValueError(f"{what}: {n} is not a multiple of {multiple_of}")
    return n


@dataclass(frozen=True)
class StructuredPruneConfig:
    """Options of the ``prune`` pass."""

    heads: int | float | None = option(
        None,
        help="attention heads to keep per layer: an integer count, or a fraction (0, 1] of the "
        "original; null keeps all. Llama/Qwen-style decoders only (BERT's config cannot express it); "
        "with grouped-query attention it must be a multiple of num_key_value_heads",
    )
    ffn: int | float | None = option(
        None, help="FFN intermediate channels to keep per layer: a count or a fraction (0, 1]; null keeps all"
    )
    layers: int | float | None = option(
        None, help="transformer layers to keep: a count or a fraction (0, 1]; null keeps all"
    )
    ffn_multiple_of: int = option(
        1, help="round the FFN width to a multiple of this (e.g. 64 for tensor-core friendly GEMMs)", ge=1
    )
    importance: UnitMethod = option(
        "activation",
        help="how heads and FFN channels are scored: 'activation' (Minitron, on calibration data), "
        "'magnitude' (weight norms, data-free) or 'random' (a baseline)",
    )
    layer_importance: LayerMethod = option(
        "cosine",
        help="how layers are scored: 'cosine' (1 - cos(input, output), ShortGPT block importance), "
        "'relative_change' (||out - in|| / ||in||) or 'random'",
    )
    calibration_batches: int = option(8, help="calibration batches used to score units", ge=1, le=10_000)
    recover: RecoverConfig | None = option(
        None, help="distill against the original model right after this pass (steps, lr, loss)"
    )

    def validate(self, path: str) -> None:
        for name in ("heads", "ffn", "layers"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise RecipeError(f"{path}.{name}: fraction {value} must be in (0, 1]")
            if isinstance(value, int) and value < 1:
                raise RecipeError(f"{path}.{name}: must keep at least 1, got {value}")
        if self.ffn_multiple_of < 1:
            raise RecipeError(f"{path}.ffn_multiple_of: must be at least 1")
        if self.calibration_batches < 1:
            raise RecipeError(f"{path}.calibration_batches: must be at least 1")


@dataclass(frozen=True)
class PrunePlan:
    heads: int
    ffn: int
    layers: int


def plan_widths(anatomy: Anatomy, config: StructuredPruneConfig) -> PrunePlan:
    """The target widths for ``anatomy``; ValueError with a user-facing message if impossible."""
    heads = resolve_width(config.heads, anatomy.num_heads, "prune.heads")
    if heads != anatomy.num_heads:
        if not anatomy.can_prune_heads:
            raise ValueError(
                f"prune.heads: {anatomy.family} models cannot lose heads and still reload (Transformers "
                "derives their head size from hidden_size / num_attention_heads); prune ffn or layers instead"
            )
        kv = anatomy.num_kv_heads
        if kv != anatomy.num_heads and heads % kv:
            raise ValueError(
                f"prune.heads: {heads} is not a multiple of num_key_value_heads={kv} "
                "(every key/value group must keep the same number of query heads)"
            )
    ffn = resolve_width(config.ffn, anatomy.intermediate_size, "prune.ffn", config.ffn_multiple_of)
    layers = resolve_width(config.layers, anatomy.num_layers, "prune.layers")
    return PrunePlan(heads, ffn, layers)


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
class StructuredPrunePass(Pass):
    name = "prune"
    description = (
        "Minitron-style structured pruning of heads, FFN channels and layers (really shrinks tensors)"
    )
    Config = StructuredPruneConfig

    def _plan(self, model: nn.Module) -> tuple[Anatomy, PrunePlan]:
        try:
            anatomy = describe_model(model)
            return anatomy, plan_widths(anatomy, self.config)
        except ValueError as e:
            raise PlanError(f"prune: {e}") from None

    def check(self, model: nn.Module, target: Target, adapter: ModelAdapter) -> None:
        self._plan(model)

    def run(self, model: nn.Module, ctx: PassContext) -> nn.Module | None:
        anatomy, plan = self._plan(model)
        cfg: StructuredPruneConfig = self.config
        self._plan_done = plan
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
        ctx.record("kept", kept)
        ctx.record("widths", {"heads": plan.heads, "ffn": plan.ffn, "layers": plan.layers})
        ctx.record("parameters", {"before": before, "after": after})
        log.info("prune: %d -> %d parameters (%s)", before, after, plan)
        return None

    def ensures(self, model: nn.Module, ctx: PassContext) -> None:
        anatomy = describe_model(model)
        problems = check_anatomy(anatomy)
        plan = getattr(self, "_plan_done", None)
        if plan is not None:
            got = PrunePlan(anatomy.num_heads, anatomy.intermediate_size, anatomy.num_layers)
            if got != plan:
                problems.append(f"widths {got} differ from the plan {plan}")
        if problems:
            raise PassError("prune: the config does not match the tensors: " + "; ".join(problems))
