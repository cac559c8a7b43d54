"""compressor.pipeline: the pass contract and the pipeline that runs and measures passes.

Toy passes on a toy ``nn.Module`` with a recording instrument: results (the original first),
details carried from ``run`` into ``ensures`` and the result, a model that ``run`` replaces,
seeds, the ``recover:`` block (with ``distill_`` replaced: no real adapter), the registry."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from compressor.config import option
from compressor.errors import PassError, RecipeError
from compressor.pipeline import (
    PASS_REGISTRY,
    Pass,
    PassContext,
    PassOutput,
    PassResult,
    Pipeline,
    ensure_finite,
    register_pass,
)


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = option(2.0, help="what the weights are multiplied by", gt=0.0)


class ScalePass(Pass[ScaleConfig]):
    """Scales every weight in place; the details say by what and its ensures checks that."""

    name = "scale"
    description = "scale the weights"
    Config = ScaleConfig

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        before = float(model.weight.detach().abs().sum())
        with torch.no_grad():
            model.weight.mul_(self.config.factor)
        return PassOutput(model, {"factor": self.config.factor, "abs_sum_before": before})

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        ratio = float(out.model.weight.detach().abs().sum()) / out.details["abs_sum_before"]
        if abs(ratio - out.details["factor"]) > 1e-4:
            raise PassError(f"scale: weights scaled by {ratio:.3g}, not {out.details['factor']}")


@dataclass(frozen=True)
class NoiseConfig:
    pass


class ReplaceWithNoisePass(Pass[NoiseConfig]):
    """Returns a new model with random weights: which ones depends on the seed."""

    name = "replace_with_noise"
    description = "a fresh random Linear"
    Config = NoiseConfig

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        fresh = nn.Linear(model.in_features, model.out_features)
        return PassOutput(fresh, {"draw": float(torch.rand(()))})


class Recorder:
    """An instrument that writes what it saw into each result's metrics."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def before_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext) -> None:
        self.events.append(("before", p.name if p else "original", id(model)))

    def after_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext, result: PassResult) -> None:
        self.events.append(("after", result.name, id(model)))
        result.metrics["weight_sum"] = float(model.weight.detach().sum())


def _ctx(**kw: Any) -> PassContext:
    return PassContext(target=None, adapter=None, teacher=None, data=None, **kw)  # type: ignore[arg-type]


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_results_start_with_the_original_and_carry_config_and_details() -> None:
    model = _linear()
    w0 = float(model.weight.detach().sum())
    pipe = Pipeline([ScalePass(ScaleConfig(factor=3.0)), ScalePass()], instruments=[Recorder()])
    out = pipe.run(model, _ctx())
    assert out is model
    assert [r.name for r in pipe.results] == ["original", "scale", "scale"]
    original, first, second = pipe.results
    assert (original.config, original.details, original.wall_s >= 0) == ({}, {}, True)
    assert first.config == {"factor": 3.0} and second.config == {"factor": 2.0}
    assert first.details["factor"] == 3.0 and second.details["factor"] == 2.0
    assert original.metrics["weight_sum"] == pytest.approx(w0)
    assert first.metrics["weight_sum"] == pytest.approx(3 * w0, rel=1e-5)
    assert second.metrics["weight_sum"] == pytest.approx(6 * w0, rel=1e-5)


def test_result_to_dict_rounds_times_and_names_the_pass() -> None:
    r = PassResult("scale", {"factor": 2.0}, 1.23456, {"m": 1.0}, {"d": [1]}, measure_s=0.0004)
    assert r.to_dict() == {
        "pass": "scale",
        "config": {"factor": 2.0},
        "wall_s": 1.235,
        "measure_s": 0.0,
        "metrics": {"m": 1.0},
        "details": {"d": [1]},
    }


def test_ensures_reads_the_details_run_returned() -> None:
    class LiesAboutFactor(ScalePass):
        def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
            out = super().run(model, ctx)
            return PassOutput(out.model, {**out.details, "factor": 5.0})

    with pytest.raises(PassError, match=r"^scale: weights scaled by 2, not 5\.0$"):
        Pipeline([LiesAboutFactor()], instruments=[]).run(_linear(), _ctx())


def test_a_new_model_from_run_replaces_the_old_one() -> None:
    rec = Recorder()
    model = _linear()
    pipe = Pipeline([ReplaceWithNoisePass(), ScalePass()], instruments=[rec])
    out = pipe.run(model, _ctx())
    assert out is not model
    ids = [e[2] for e in rec.events]
    # original measured on the old model; the noise pass's result, and the scale pass, on the new one
    assert ids[0] == id(model) and ids[1] == id(model) and ids[2:] == [id(out)] * 3
    assert pipe.results[-1].metrics["weight_sum"] == pytest.approx(2 * pipe.results[1].metrics["weight_sum"])


def test_each_pass_runs_under_seed_plus_its_index() -> None:
    def draws(seed: int) -> list[float]:
        pipe = Pipeline([ReplaceWithNoisePass(), ReplaceWithNoisePass()], instruments=[])
        torch.manual_seed(1234)  # whatever the global state was, the pipeline resets it
        pipe.run(_linear(), _ctx(seed=seed))
        return [r.details["draw"] for r in pipe.results[1:]]

    a, b = draws(7), draws(7)
    assert a == b
    assert draws(8)[0] == a[1]  # pass 0 under seed 8 draws what pass 1 under seed 7 did
    torch.manual_seed(7)
    nn.Linear(3, 2)  # the pass builds its Linear before drawing
    assert a[0] == float(torch.rand(()))


def test_requires_runs_before_run_and_can_refuse() -> None:
    calls: list[str] = []

    class Picky(ScalePass):
        def requires(self, model: nn.Module, ctx: PassContext) -> None:
            calls.append("requires")
            if not ctx.data:
                raise PassError("picky: needs calibration data")

        def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
            calls.append("run")
            return super().run(model, ctx)

    with pytest.raises(PassError, match="picky: needs calibration data"):
        Pipeline([Picky()], instruments=[]).run(_linear(), _ctx())
    assert calls == ["requires"]


def test_hooks_and_instruments_are_called_in_order() -> None:
    rec = Recorder()
    started: list[tuple[int, str]] = []
    measured: list[str] = []
    pipe = Pipeline(
        [ScalePass(), ReplaceWithNoisePass()],
        instruments=[rec],
        on_pass_start=lambda i, p: started.append((i, p.name)),
        on_measure_start=lambda p: measured.append(p.name if p else "original"),
    )
    pipe.run(_linear(), _ctx())
    assert started == [(0, "scale"), (1, "replace_with_noise")]
    assert measured == ["original", "scale", "replace_with_noise"]
    assert [e[:2] for e in rec.events] == [
        ("after", "original"),
        ("before", "scale"),
        ("after", "scale"),
        ("before", "replace_with_noise"),
        ("after", "replace_with_noise"),
    ]


def test_no_instruments_means_no_measuring_and_empty_metrics() -> None:
    measured: list[object] = []
    pipe = Pipeline([ScalePass()], instruments=[], on_measure_start=measured.append)
    pipe.run(_linear(), _ctx())
    assert measured == [] and [r.metrics for r in pipe.results] == [{}, {}]


def test_a_second_run_starts_its_results_afresh() -> None:
    pipe = Pipeline([ScalePass()], instruments=[])
    pipe.run(_linear(), _ctx())
    pipe.run(_linear(), _ctx())
    assert [r.name for r in pipe.results] == ["original", "scale"]


# ---- recover: distillation after the pass ---------------------------------------------------


@dataclass(frozen=True)
class LossyConfig:
    recover: Any = None


class LossyPass(Pass[LossyConfig]):
    name = "lossy"
    description = "a pass with a recover block"
    Config = LossyConfig

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        return PassOutput(model, {"kept": 1})

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        if self.config.recover is not None and "recover" not in out.details:
            raise PassError("lossy: ensures ran before the recovery")


def test_recover_distills_after_run_and_records_the_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    import compressor.distill.loop as loop

    seen: dict[str, Any] = {}

    def fake_distill(
        model: Any, teacher: Any, adapter: Any, batches: Any, cfg: Any, progress: Any, work_dir: Any
    ):
        seen.update(model=model, teacher=teacher, batches=batches, cfg=cfg, work_dir=work_dir)
        return [0.5, 0.3333333333, 0.25]

    monkeypatch.setattr(loop, "distill_", fake_distill)
    model, teacher = _linear(), _linear()
    data = SimpleNamespace(train=["batch"], eval=[])
    ctx = PassContext(None, None, teacher, data, work_dir=None)  # type: ignore[arg-type]
    pipe = Pipeline([LossyPass(LossyConfig(recover="cfg"))], instruments=[])
    pipe.run(model, ctx)
    assert seen == {"model": model, "teacher": teacher, "batches": ["batch"], "cfg": "cfg", "work_dir": None}
    assert pipe.results[1].details == {
        "kept": 1,
        "recover": {"steps": 3, "loss_first": 0.5, "loss_last": 0.25},
    }


def test_recover_without_training_data_is_refused() -> None:
    ctx = PassContext(None, None, None, SimpleNamespace(train=[], eval=[]))  # type: ignore[arg-type]
    with pytest.raises(PassError) as e:
        Pipeline([LossyPass(LossyConfig(recover="cfg"))], instruments=[]).run(_linear(), ctx)
    assert str(e.value) == "recover: needs training data (data.train_samples is 0)"


def test_no_recover_block_means_no_distillation() -> None:
    pipe = Pipeline([LossyPass(LossyConfig(recover=None))], instruments=[])
    pipe.run(_linear(), _ctx())  # no training data, and none needed
    assert pipe.results[1].details == {"kept": 1}


# ---- Pass, the registry, ensure_finite --------------------------------------------------------


def test_a_pass_without_config_gets_its_default_and_config_from_dict_is_strict() -> None:
    assert ScalePass().config == ScaleConfig(factor=2.0)
    assert ScalePass.config_from_dict({"factor": 4}, "passes[0]") == ScaleConfig(factor=4.0)
    assert ScalePass.config_from_dict(None, "passes[0]") == ScaleConfig()
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.factr: unknown key; allowed keys here: factor$"):
        ScalePass.config_from_dict({"factr": 4}, "passes[0]")
    with pytest.raises(
        RecipeError, match=r"^passes\[1\]\.factor: 0\.0 is out of range \(allowed: above 0\)$"
    ):
        ScalePass.config_from_dict({"factor": 0.0}, "passes[1]")


def test_default_plan_returns_the_state_unchanged() -> None:
    state = object()
    assert ScalePass().plan(state) is state  # type: ignore[arg-type]


def test_register_pass_refuses_a_second_class_under_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("compressor.pipeline.PASS_REGISTRY", dict(PASS_REGISTRY))
    from compressor import pipeline

    class A(ScalePass):
        name = "registered_twice"

    class B(ScalePass):
        name = "registered_twice"

    assert register_pass(A) is A
    assert register_pass(A) is A  # the same class again is fine (a module imported twice)
    with pytest.raises(ValueError, match=r"^pass name 'registered_twice' registered twice$"):
        register_pass(B)
    assert pipeline.PASS_REGISTRY["registered_twice"] is A
    assert "registered_twice" not in PASS_REGISTRY


def test_ensure_finite() -> None:
    ensure_finite("enc.q", torch.tensor([1.0, -3.0e38]), "scale")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(PassError) as e:
            ensure_finite("enc.q", torch.tensor([1.0, bad]), "weight_scale")
        assert str(e.value) == "enc.q: weight_scale has non-finite values"


def test_progress_bar_of_the_context_uses_its_setting() -> None:
    opened: list[tuple[str, int | None, str]] = []

    class Bar:
        def update(self, n: int = 1) -> None: ...

        def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

        def close(self) -> None:
            opened.append(("closed", None, ""))

    def factory(desc: str, total: int | None, unit: str) -> Bar:
        opened.append((desc, total, unit))
        return Bar()

    with _ctx(progress=factory).progress_bar("calibrate", 4, unit="batch"):
        pass
    assert opened == [("calibrate", 4, "batch"), ("closed", None, "")]
    assert _ctx().device == torch.device("cpu") and _ctx().seed == 0
