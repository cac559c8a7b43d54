"""The plan: what the model will look like after each pass and export, checked before any runs.

A recipe is judged once, before any pass touches the model. ``check_plan`` walks the
passes in order, handing each a ``PlanState`` that describes the model *as the passes
before it will have left it* -- every Linear layer's shape and form (float, int8, fp8,
int4; 2:4 sparse or not), the structural widths a ``prune`` changed, a diffusion model's
sampling spec -- and takes back the state that pass will leave. A check after ``prune``
therefore judges the pruned widths, and a check after ``quantize`` sees int8 layers.

The exports then see the final state plus the artifacts the exports before them write.
Each exporter declares what it ``consumes`` (artifact kinds it builds from) and which
layer ``forms`` it can take; ordering and forms are checked here, generically, after the
exporter's own ``check_plan`` has judged what only it knows (file names, a form's facts).

This module is part of the core: it knows passes and exporters only through the two
small protocols below, never by importing them, and it never branches on adapter types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import nn

from compressor.errors import PlanError
from compressor.modules import matches

if TYPE_CHECKING:
    from compressor.adapters.base import ModelAdapter
    from compressor.targets import Target

FLOAT = "float"
"""The form of a Linear layer no pass has quantized."""


@dataclass(frozen=True)
class LinearPlan:
    """One Linear layer as the plan leaves it: its shape and how its weights are stored.

    ``form`` is ``float``, ``int8``, ``fp8`` or ``int4``; ``facts`` holds the form's
    options the exports care about (``activations``, ``symmetric``, ``explicit_smooth``);
    ``by`` names the step that gave it this form (``passes[1] (quantize)``)."""

    in_features: int
    out_features: int
    form: str = FLOAT
    sparse24: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)
    by: str = ""


@dataclass(frozen=True)
class DiffusionPlan:
    """A diffusion model's sampling as the plan leaves it."""

    steps: int
    sampler: str
    guidance: str
    guidance_embedded: bool
    accepts_guidance: bool
    num_train_timesteps: int


@dataclass(frozen=True)
class Artifact:
    """A file an export before this one writes into the bundle: ``kind`` is what it is
    (``onnx``, ``onnx_qdq``, ``torch_export`` ...), ``by`` the export that writes it."""

    kind: str
    file: str
    by: str


@dataclass(frozen=True)
class PlanState:
    """The model as the steps planned so far will leave it, and where it will run.

    ``model`` is the model as loaded: read it only for what no pass changes (its module
    tree, its family); what passes change lives in the other fields. ``widths`` holds the
    structural widths a prune set (``heads``, ``ffn``, ``layers``); empty until one does.
    ``where`` names the step being planned, for messages."""

    target: Target
    adapter: ModelAdapter
    model: nn.Module
    linears: Mapping[str, LinearPlan]
    widths: Mapping[str, int] = field(default_factory=dict)
    diffusion: DiffusionPlan | None = None
    artifacts: tuple[Artifact, ...] = ()
    where: str = ""
    kv_cache: str | None = None  # "fp8": a pass quantized the KV cache (``kv_cache_by`` says which)
    kv_cache_by: str = ""

    @classmethod
    def from_model(cls, model: nn.Module, target: Target, adapter: ModelAdapter) -> PlanState:
        """The state before any pass: every ``nn.Linear`` in float, the model's own sampling."""
        linears = {
            n: LinearPlan(m.in_features, m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear)
        }
        return cls(target, adapter, model, linears, diffusion=_diffusion_of(model))

    def replace(self, **changes: Any) -> PlanState:
        return dataclasses.replace(self, **changes)

    def with_linears(self, changed: Mapping[str, LinearPlan]) -> PlanState:
        """This state with the named layers replaced by ``changed``'s plans."""
        return self.replace(linears={**self.linears, **changed})

    def select(self, targets: Sequence[str], ignore: Sequence[str] = (), what: str = "pass") -> list[str]:
        """Names of the Linear layers matched by ``targets`` and not by ``ignore``; every target
        pattern must match a layer, so a typo fails the plan (``compressor.modules.select_modules``
        over the planned layers)."""
        candidates = list(self.linears)
        for pattern in targets:
            if not any(matches(n, pattern) for n in candidates):
                sample = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
                raise PlanError(
                    f"{what}: target pattern {pattern!r} matches no Linear layer of the model "
                    f"(layers look like: {sample})"
                )
        chosen = [n for n in candidates if any(matches(n, p) for p in targets)]
        return [n for n in chosen if not any(matches(n, p) for p in ignore)]

    def written(self) -> dict[str, list[str]]:
        """The files the exports planned so far write, by artifact kind, in order."""
        out: dict[str, list[str]] = {}
        for a in self.artifacts:
            out.setdefault(a.kind, []).append(a.file)
        return out

    def forms(self) -> dict[str, list[str]]:
        """Layer names by form, float ones left out: ``{"int8": [...], "fp8": [...]}``."""
        out: dict[str, list[str]] = {}
        for n, lin in self.linears.items():
            if lin.form != FLOAT:
                out.setdefault(lin.form, []).append(n)
        return out


def _diffusion_of(model: nn.Module) -> DiffusionPlan | None:
    """A diffusion model's sampling facts, read by duck typing (the core imports no adapter)."""
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(model, "num_train_timesteps"):
        return None
    conditioner = getattr(model, "conditioner", None)
    return DiffusionPlan(
        steps=int(spec.steps),
        sampler=str(spec.sampler),
        guidance=str(spec.guidance),
        guidance_embedded=bool(getattr(model, "guidance_embedded", False)),
        accepts_guidance=bool(getattr(conditioner, "accepts_guidance", True)),
        num_train_timesteps=int(model.num_train_timesteps),  # type: ignore[arg-type]
    )


class PlannedPass(Protocol):
    """What planning needs of a pass (``compressor.pipeline.Pass``)."""

    name: ClassVar[str]

    def plan(self, state: PlanState) -> PlanState: ...


class PlannedExport(Protocol):
    """What planning needs of an exporter (``compressor.exporters.base.Exporter``)."""

    name: ClassVar[str]
    consumes: ClassVar[tuple[str, ...]]
    forms: ClassVar[frozenset[str] | None]
    kv_cache_forms: ClassVar[frozenset[str]]

    def check_plan(self, state: PlanState) -> None: ...

    def output_files(self) -> dict[str, str]: ...


def plan_passes(state: PlanState, passes: Sequence[PlannedPass]) -> list[PlanState]:
    """The state before the first pass, then after each: ``len(passes) + 1`` states."""
    states = [state]
    for i, p in enumerate(passes):
        before = states[-1].replace(where=f"passes[{i}] ({p.name})")
        states.append(p.plan(before).replace(where=""))
    return states


def check_export_forms(state: PlanState, e: PlannedExport) -> None:
    """Refuse an export that cannot take a layer form the passes leave (``forms`` ClassVar)."""
    if e.forms is None:
        return
    for form, names in state.forms().items():
        if form not in e.forms:
            by = state.linears[names[0]].by
            took = ", ".join(sorted(e.forms - {FLOAT})) or "none"
            raise PlanError(
                f"{state.where}: {e.name} cannot take {form} layers ({names[0]}"
                f"{', ...' if len(names) > 1 else ''}, from {by or 'the model'}); quantized forms it takes: "
                f"{took}. Change that pass's method or drop this export"
            )


def check_export_kv_cache(state: PlanState, e: PlannedExport) -> None:
    """Refuse an export that cannot write the quantized KV cache a pass planned."""
    if state.kv_cache is not None and state.kv_cache not in e.kv_cache_forms:
        raise PlanError(
            f"{state.where}: {e.name} cannot write a {state.kv_cache} KV cache (kv_cache: {state.kv_cache} "
            f"on {state.kv_cache_by}); the compressed_tensors export (vLLM) writes it: use that export, or "
            "set kv_cache: none"
        )


def check_export_inputs(state: PlanState, e: PlannedExport) -> None:
    """Refuse an export that builds from an artifact kind no export before it writes."""
    if not e.consumes:
        return
    if not any(a.kind in e.consumes for a in state.artifacts):
        wanted = " or ".join(f"`- format: {k}`" for k in e.consumes)
        raise PlanError(
            f"{state.where}: {e.name} builds from {' or '.join(e.consumes)} output, which no export before "
            f"it writes; add {wanted} before `- format: {e.name}` in exports"
        )


def plan_exports(state: PlanState, exporters: Sequence[PlannedExport]) -> PlanState:
    """Check every export against the final state and the artifacts written before it."""
    for i, e in enumerate(exporters):
        here = state.replace(where=f"exports[{i}] ({e.name})")
        e.check_plan(here)  # first: an exporter's own refusal says more than the generic ones
        check_export_forms(here, e)
        check_export_kv_cache(here, e)
        check_export_inputs(here, e)
        written = tuple(Artifact(kind, file, here.where) for kind, file in e.output_files().items())
        state = state.replace(artifacts=state.artifacts + written)
    return state


def check_plan(
    target: Target,
    adapter: ModelAdapter,
    model: nn.Module,
    passes: Sequence[PlannedPass],
    exporters: Sequence[PlannedExport] = (),
) -> PlanState:
    """The whole plan checked before any pass runs; returns the final state (raises PlanError,
    or RecipeError for options that contradict each other)."""
    states = plan_passes(PlanState.from_model(model, target, adapter), passes)
    return plan_exports(states[-1], exporters)
