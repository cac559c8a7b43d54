"""compressor.planning: the state each pass and export is judged against, before any work.

Tiny fake passes and exporters implementing the two protocols (``PlannedPass``,
``PlannedExport``) drive ``plan_passes`` / ``plan_exports`` / ``check_plan`` on a toy
``nn.Module``; each test states the input and the exact state or message expected."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
from torch import nn

from compressor.errors import PlanError
from compressor.planning import (
    FLOAT,
    Artifact,
    DiffusionPlan,
    LinearPlan,
    PlanState,
    check_export_forms,
    check_export_inputs,
    check_plan,
    plan_exports,
    plan_passes,
)
from compressor.targets import Target, get_target


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"q": nn.Linear(4, 8), "k": nn.Linear(4, 8)})
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2, bias=False)


@pytest.fixture
def cpu() -> Target:
    return get_target("cpu")


@pytest.fixture
def state(cpu: Target) -> PlanState:
    return PlanState.from_model(Toy(), cpu, adapter=None)  # type: ignore[arg-type]


class ToInt8:
    """A pass that quantizes the layers its patterns select, recording where it was planned."""

    name: ClassVar[str] = "to_int8"

    def __init__(self, targets: tuple[str, ...] = ("*",)) -> None:
        self.targets = targets
        self.seen: list[PlanState] = []

    def plan(self, state: PlanState) -> PlanState:
        self.seen.append(state)
        names = state.select(self.targets, what=self.name)
        changed = {n: dataclasses.replace(state.linears[n], form="int8", by=state.where) for n in names}
        return state.with_linears(changed)


class Export:
    """An exporter declaring ``consumes`` / ``forms``, writing ``files``, logging each check."""

    name: ClassVar[str] = "fake"
    consumes: ClassVar[tuple[str, ...]] = ()
    forms: ClassVar[frozenset[str] | None] = None

    def __init__(self, files: dict[str, str] | None = None, refuse: str = "", log: list[str] | None = None):
        self.files = files or {}
        self.refuse = refuse
        self.log = log if log is not None else []
        self.states: list[PlanState] = []

    def check_plan(self, state: PlanState) -> None:
        self.log.append(f"check_plan {state.where}")
        self.states.append(state)
        if self.refuse:
            raise PlanError(self.refuse)

    def output_files(self) -> dict[str, str]:
        return dict(self.files)


class FloatOnly(Export):
    name: ClassVar[str] = "float_only"
    forms: ClassVar[frozenset[str] | None] = frozenset({FLOAT})


class TakesInt8(Export):
    name: ClassVar[str] = "takes_int8"
    forms: ClassVar[frozenset[str] | None] = frozenset({FLOAT, "int8", "int4"})


class Engine(Export):
    name: ClassVar[str] = "engine"
    consumes: ClassVar[tuple[str, ...]] = ("onnx_qdq", "onnx")


# ---- PlanState ------------------------------------------------------------------------------


def test_from_model_lists_every_linear_in_float(state: PlanState, cpu: Target) -> None:
    assert dict(state.linears) == {
        "enc.q": LinearPlan(4, 8),
        "enc.k": LinearPlan(4, 8),
        "head": LinearPlan(8, 2),
    }
    assert next(iter(state.linears.values())).form == FLOAT == "float"
    assert state.target is cpu and state.widths == {} and state.artifacts == () and state.where == ""
    assert state.diffusion is None  # no spec / num_train_timesteps on the model


def test_from_model_reads_a_diffusion_models_sampling(cpu: Target) -> None:
    class Spec:
        steps = 8
        sampler = "ddim"
        guidance = "cfg"

    class Conditioner:
        accepts_guidance = False

    model = nn.Linear(2, 2)
    model.spec = Spec()  # type: ignore[assignment]
    model.num_train_timesteps = 1000  # type: ignore[assignment]
    model.conditioner = Conditioner()  # type: ignore[assignment]
    state = PlanState.from_model(model, cpu, adapter=None)  # type: ignore[arg-type]
    assert state.diffusion == DiffusionPlan(
        steps=8,
        sampler="ddim",
        guidance="cfg",
        guidance_embedded=False,
        accepts_guidance=False,
        num_train_timesteps=1000,
    )
    assert dict(state.linears) == {"": LinearPlan(2, 2)}  # the model itself is the Linear


def test_with_linears_replaces_only_the_named_layers(state: PlanState) -> None:
    after = state.with_linears({"head": LinearPlan(8, 2, form="fp8", facts={"weights": "per_tensor"})})
    assert after.linears["head"].form == "fp8" and after.linears["head"].facts == {"weights": "per_tensor"}
    assert after.linears["enc.q"] is state.linears["enc.q"]
    assert list(after.linears) == ["enc.q", "enc.k", "head"]  # order kept
    assert state.linears["head"].form == FLOAT  # the state before is left as it was


def test_select_globs_regex_and_ignore(state: PlanState) -> None:
    assert state.select(["enc.*"]) == ["enc.q", "enc.k"]
    assert state.select(["re:enc\\.(q|k)", "head"], ignore=["enc.k"]) == ["enc.q", "head"]
    assert state.select(["*"], ignore=["re:.*"]) == []
    assert state.select(["head", "*"]) == ["enc.q", "enc.k", "head"]  # each layer once, in model order


def test_select_refuses_a_pattern_that_matches_nothing(state: PlanState) -> None:
    with pytest.raises(PlanError) as e:
        state.select(["enc.*", "decoder.*"], what="passes[0] (quantize)")
    assert str(e.value) == (
        "passes[0] (quantize): target pattern 'decoder.*' matches no Linear layer of the model "
        "(layers look like: enc.q, enc.k, head)"
    )


def test_select_samples_four_layers_then_an_ellipsis(cpu: Target) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    state = PlanState.from_model(model, cpu, adapter=None)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match=r"\(layers look like: 0, 1, 2, 3, \.\.\.\)$"):
        state.select(["x"])


def test_select_sees_the_planned_layers_not_the_loaded_model(state: PlanState) -> None:
    pruned = state.replace(linears={"head": state.linears["head"]})  # as a prune leaves it
    with pytest.raises(PlanError, match="'enc.q' matches no Linear layer"):
        pruned.select(["enc.q"])


def test_forms_leaves_float_out_and_written_groups_by_kind(state: PlanState) -> None:
    assert state.forms() == {}
    after = state.with_linears(
        {"head": LinearPlan(8, 2, form="int8"), "enc.q": LinearPlan(4, 8, form="int8", sparse24=True)}
    )
    assert after.forms() == {"int8": ["enc.q", "head"]}
    written = after.replace(
        artifacts=(
            Artifact("onnx", "model.onnx", "exports[0] (onnx)"),
            Artifact("torch_export", "model.pt2", "exports[1] (torch_export)"),
            Artifact("onnx", "model_fp16.onnx", "exports[2] (onnx)"),
        )
    )
    assert written.written() == {"onnx": ["model.onnx", "model_fp16.onnx"], "torch_export": ["model.pt2"]}


# ---- plan_passes ----------------------------------------------------------------------------


def test_plan_passes_gives_one_state_more_than_passes_with_where_set_while_planning(
    state: PlanState,
) -> None:
    first, second = ToInt8(("enc.*",)), ToInt8(("head",))
    states = plan_passes(state, [first, second])
    assert len(states) == 3 and states[0] is state
    assert [s.where for s in first.seen + second.seen] == ["passes[0] (to_int8)", "passes[1] (to_int8)"]
    assert [s.where for s in states] == ["", "", ""]  # reset after each pass
    assert states[1].forms() == {"int8": ["enc.q", "enc.k"]}
    assert states[2].forms() == {"int8": ["enc.q", "enc.k", "head"]}
    assert states[2].linears["enc.q"].by == "passes[0] (to_int8)"
    assert states[2].linears["head"].by == "passes[1] (to_int8)"
    assert second.seen[0].linears["enc.q"].form == "int8"  # the second pass judges what the first left


def test_plan_passes_with_no_passes_is_the_state_alone(state: PlanState) -> None:
    assert plan_passes(state, []) == [state]


def test_a_pass_refusal_names_where_it_was_planned(state: PlanState) -> None:
    class NoInt8:
        name: ClassVar[str] = "no_int8"

        def plan(self, state: PlanState) -> PlanState:
            if state.forms():
                raise PlanError(f"{state.where}: takes float layers only")
            return state

    with pytest.raises(PlanError) as e:
        plan_passes(state, [NoInt8(), ToInt8(), NoInt8()])
    assert str(e.value) == "passes[2] (no_int8): takes float layers only"


# ---- exports --------------------------------------------------------------------------------


def test_check_export_forms_refuses_a_form_with_the_exact_message(state: PlanState) -> None:
    after = plan_passes(state, [ToInt8(("enc.*",))])[-1].replace(where="exports[0] (float_only)")
    with pytest.raises(PlanError) as e:
        check_export_forms(after, FloatOnly())
    assert str(e.value) == (
        "exports[0] (float_only): float_only cannot take int8 layers (enc.q, ..., from passes[0] (to_int8)); "
        "quantized forms it takes: none. Change that pass's method or drop this export"
    )


def test_check_export_forms_one_layer_no_ellipsis_and_the_forms_it_takes(state: PlanState) -> None:
    class Int4Only(Export):
        name: ClassVar[str] = "int4_only"
        forms: ClassVar[frozenset[str] | None] = frozenset({FLOAT, "int4", "int8"})

    after = state.with_linears({"head": LinearPlan(8, 2, form="fp8")}).replace(where="exports[1] (int4_only)")
    with pytest.raises(PlanError) as e:
        check_export_forms(after, Int4Only())
    assert str(e.value) == (
        "exports[1] (int4_only): int4_only cannot take fp8 layers (head, from the model); "
        "quantized forms it takes: int4, int8. Change that pass's method or drop this export"
    )


def test_check_export_forms_accepts_what_it_takes_and_none_means_any(state: PlanState) -> None:
    after = plan_passes(state, [ToInt8()])[-1]
    check_export_forms(after, TakesInt8())
    check_export_forms(after.with_linears({"head": LinearPlan(8, 2, form="fp8")}), Export())
    check_export_forms(state, FloatOnly())


def test_check_export_inputs_refuses_a_missing_artifact(state: PlanState) -> None:
    here = state.replace(
        where="exports[1] (engine)",
        artifacts=(Artifact("torch_export", "m.pt2", "exports[0] (torch_export)"),),
    )
    with pytest.raises(PlanError) as e:
        check_export_inputs(here, Engine())
    assert str(e.value) == (
        "exports[1] (engine): engine builds from onnx_qdq or onnx output, which no export before it writes; "
        "add `- format: onnx_qdq` or `- format: onnx` before `- format: engine` in exports"
    )


def test_check_export_inputs_accepts_any_consumed_kind_written_before(state: PlanState) -> None:
    check_export_inputs(
        state.replace(artifacts=(Artifact("onnx", "model.onnx", "exports[0] (onnx)"),)), Engine()
    )
    check_export_inputs(state, Export())  # consumes nothing


def test_plan_exports_records_artifacts_in_order_with_who_wrote_them(state: PlanState) -> None:
    onnx = Export({"onnx_qdq": "model.qdq.onnx"})
    engine = Engine({"tensorrt": "model.plan"})
    final = plan_exports(state, [onnx, engine])
    assert final.artifacts == (
        Artifact("onnx_qdq", "model.qdq.onnx", "exports[0] (fake)"),
        Artifact("tensorrt", "model.plan", "exports[1] (engine)"),
    )
    assert final.where == ""
    assert engine.states[0].written() == {"onnx_qdq": ["model.qdq.onnx"]}  # what came before, only
    assert onnx.states[0].artifacts == ()


def test_plan_exports_refuses_a_consumer_before_its_producer(state: PlanState) -> None:
    with pytest.raises(PlanError, match=r"^exports\[0\] \(engine\): engine builds from onnx_qdq or onnx"):
        plan_exports(state, [Engine(), Export({"onnx": "model.onnx"})])


def test_plan_exports_runs_the_exporters_own_check_first(state: PlanState) -> None:
    """An engine with nothing to build from and an int8 layer it cannot take: its own refusal
    is the one the user sees, and the generic checks never run."""

    class OwnCheck(Engine):
        forms: ClassVar[frozenset[str] | None] = frozenset({FLOAT})

    log: list[str] = []
    after = plan_passes(state, [ToInt8()])[-1]
    with pytest.raises(PlanError) as e:
        plan_exports(after, [Export(log=log), OwnCheck(refuse="engine: needs static int8", log=log)])
    assert str(e.value) == "engine: needs static int8"
    assert log == ["check_plan exports[0] (fake)", "check_plan exports[1] (engine)"]
    with pytest.raises(PlanError, match="cannot take int8 layers"):  # forms before inputs
        plan_exports(after, [OwnCheck()])


def test_check_plan_walks_passes_then_exports(cpu: Target) -> None:
    exports: list[Any] = [TakesInt8({"onnx": "model.onnx"}), Engine({"tensorrt": "model.plan"})]
    final = check_plan(cpu, None, Toy(), [ToInt8(("enc.q",))], exports)  # type: ignore[arg-type]
    assert final.forms() == {"int8": ["enc.q"]}
    assert [a.kind for a in final.artifacts] == ["onnx", "tensorrt"]
    with pytest.raises(PlanError, match=r"^exports\[0\] \(float_only\): float_only cannot take int8"):
        check_plan(cpu, None, Toy(), [ToInt8()], [FloatOnly()])  # type: ignore[arg-type]
    assert check_plan(cpu, None, Toy(), []).forms() == {}  # type: ignore[arg-type]
