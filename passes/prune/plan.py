"""The ``prune`` pass's plan: the widths it will keep and the Linear shapes they give.

``plan_widths`` turns the recipe's widths (counts or fractions) into one uniform width per
dimension and refuses the impossible ones (more heads than the model has, a head count
that splits key/value groups unevenly, heads of a BERT whose config cannot express it).
``planned_linears`` then says what every Linear layer will look like after the surgery of
``passes/prune/structure.py``, so that the passes after a prune judge the pruned model: a
quantize or sparsify check after ``prune(ffn=64)`` sees FFN layers 64 wide, and the
layers a depth prune drops are gone. Both work from the widths an earlier prune planned
(``PlanState.widths``) when there is one, not from the model as loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from compressor.errors import PlanError
from compressor.passes.prune.config import StructuredPruneConfig
from compressor.passes.prune.structure import Anatomy, Family
from compressor.planning import FLOAT, LinearPlan, PlanState

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
class PrunePlan:
    heads: int
    ffn: int
    layers: int

    def as_widths(self) -> dict[str, int]:
        """The plan as ``PlanState.widths`` and the manifest's ``widths`` detail hold it."""
        return {"heads": self.heads, "ffn": self.ffn, "layers": self.layers}


@dataclass(frozen=True)
class PlannedWidths:
    """A model's structural widths as the plan so far leaves them (what ``plan_widths`` judges)."""

    family: Family
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int

    @property
    def can_prune_heads(self) -> bool:
        return self.family == "llama"

    @classmethod
    def of(cls, anatomy: Anatomy, planned: Mapping[str, int]) -> PlannedWidths:
        """``anatomy``'s widths, or those an earlier prune planned (``planned``, maybe empty)."""
        heads = planned.get("heads", anatomy.num_heads)
        # multi-head attention loses key/value heads with the query heads; grouped-query keeps them
        kv = heads if anatomy.num_kv_heads == anatomy.num_heads else anatomy.num_kv_heads
        return cls(
            anatomy.family,
            heads,
            kv,
            anatomy.head_dim,
            planned.get("ffn", anatomy.intermediate_size),
            planned.get("layers", anatomy.num_layers),
        )


def plan_widths(anatomy: Anatomy | PlannedWidths, config: StructuredPruneConfig) -> PrunePlan:
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


def _split_by_layer(
    state: PlanState, layers_name: str, num_layers: int
) -> tuple[dict[str, LinearPlan], dict[str, dict[int, LinearPlan]]]:
    """The planned Linear layers outside the layer list, and those inside it by name within a
    layer (``mlp.up_proj``) and layer index."""
    prefix = f"{layers_name}." if layers_name else ""
    outside: dict[str, LinearPlan] = {}
    inside: dict[str, dict[int, LinearPlan]] = {}
    for name, lin in state.linears.items():
        index, _, part = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if index.isdigit() and part and int(index) < num_layers:
            inside.setdefault(part, {})[int(index)] = lin
        else:
            outside[name] = lin
    return outside, inside


def _new_shapes(anatomy: Anatomy, before: PlannedWidths, plan: PrunePlan) -> dict[str, tuple[str, int]]:
    """The layer parts the surgery rebuilds: part -> (the dimension that shrinks, its new size)."""
    parts, hd = anatomy.parts, before.head_dim
    shapes: dict[str, tuple[str, int]] = {}
    if plan.heads != before.num_heads:
        shapes[parts.q] = ("out_features", plan.heads * hd)
        shapes[parts.o] = ("in_features", plan.heads * hd)
        if before.num_kv_heads == before.num_heads:  # multi-head: k and v lose the same heads
            shapes[parts.k] = ("out_features", plan.heads * hd)
            shapes[parts.v] = ("out_features", plan.heads * hd)
    if plan.ffn != before.intermediate_size:
        for part in parts.ffn_in:
            shapes[part] = ("out_features", plan.ffn)
        shapes[parts.ffn_out] = ("in_features", plan.ffn)
    return shapes


def planned_linears(
    state: PlanState, anatomy: Anatomy, before: PlannedWidths, plan: PrunePlan
) -> dict[str, LinearPlan]:
    """Every Linear layer as the prune leaves it (``state.linears`` replaced whole).

    A rebuilt layer is a new float ``nn.Linear`` without a 2:4 mask (its input columns may
    no longer be 2:4 either), so it is planned dense. Which layers a depth prune keeps is
    decided by scores at run time; layer ``j`` of the result is 2:4 only where that part is
    2:4 in every layer it may come from."""
    outside, inside = _split_by_layer(state, anatomy.layers_name, before.num_layers)
    for part, by_index in inside.items():
        for i, lin in by_index.items():
            if lin.form != FLOAT:
                raise PlanError(
                    f"prune: {anatomy.layers_name}.{i}.{part} is {lin.form} (from {lin.by or 'the model'}); "
                    "structured pruning slices float Linear layers: put prune before quantize"
                )
    shapes = _new_shapes(anatomy, before, plan)
    dropping = plan.layers != before.num_layers
    result = dict(outside)
    for part, by_index in inside.items():
        for j in range(plan.layers):
            if j not in by_index:
                continue
            lin = by_index[j]
            if dropping:
                lin = dataclasses.replace(lin, sparse24=all(x.sparse24 for x in by_index.values()))
            if part in shapes:
                dim, size = shapes[part]
                in_f = size if dim == "in_features" else lin.in_features
                out_f = size if dim == "out_features" else lin.out_features
                lin = dataclasses.replace(
                    lin, in_features=in_f, out_features=out_f, sparse24=False, by=state.where
                )
            result[f"{anatomy.layers_name}.{j}.{part}"] = lin
    return result
