"""The diffusion passes together: a composed pipeline, recipe errors, plan-time refusals."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from compressor.errors import PlanError, RecipeError
from compressor.passes.diffusion.adaptive_guidance import AdaptiveGuidancePass
from compressor.passes.diffusion.consistency_distill import ConsistencyDistillPass
from compressor.passes.diffusion.guidance_distill import GuidanceDistillPass
from compressor.passes.diffusion.progressive_distill import ProgressiveDistillPass
from compressor.passes.diffusion.scheduler import SchedulerPass
from compressor.pipeline import MetricsInstrument, Pipeline
from compressor.planning import plan_passes
from compressor.recipe import parse_recipe
from tests.helpers.diffusion import make_ctx, plan_state, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread

ALL = (
    GuidanceDistillPass,
    ProgressiveDistillPass,
    ConsistencyDistillPass,
    SchedulerPass,
    AdaptiveGuidancePass,
)


def test_composed_pipeline_measures_each_student(teacher, adapter, data) -> None:
    passes = [
        GuidanceDistillPass(GuidanceDistillPass.Config(train_steps=2)),
        ConsistencyDistillPass(ConsistencyDistillPass.Config(sampling_steps=2, train_steps=2)),
    ]
    pipe = Pipeline(passes, [MetricsInstrument()])
    planned = plan_passes(plan_state(teacher, adapter), passes)[-1].diffusion
    out = pipe.run(teacher, make_ctx(teacher, adapter, data))
    nfes = [r.metrics["nfe"] for r in pipe.results]
    assert nfes == [8.0, 4.0, 2.0]
    assert out.guidance_embedded and out.spec.sampler == "lcm"
    assert all(0.0 <= r.metrics["class_acc"] <= 1.0 and r.metrics["fd"] > 0 for r in pipe.results)
    assert planned == plan_state(out, adapter).diffusion  # the plan foresaw the final student
    assert planned is not None and (planned.steps, planned.guidance) == (2, "embedded")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"pass": "progressive_distill", "start_steps": 6, "final_steps": 4},
            "passes[0].start_steps: 6 is not",
        ),
        ({"pass": "guidance_distill", "guidance_min": 5.0}, "passes[0].guidance_min/guidance_max"),
        ({"pass": "consistency_distill", "sampling_steps": 0}, "passes[0].sampling_steps: must be between"),
        ({"pass": "consistency_distill", "segments": 2}, "set sampling_steps: 2"),
        ({"pass": "scheduler", "solver": "euler"}, "passes[0].solver: 'euler' is not one of"),
        ({"pass": "adaptive_guidance", "threshold": 2}, "passes[0].threshold: must be in"),
        ({"pass": "adaptive_guidance", "warmup": 1.5}, "passes[0].warmup: must be in"),
        ({"pass": "guidance_distill", "train_steps": 0}, "passes[0].train_steps: must be at least 1"),
        ({"pass": "consistency_distill", "lora_rank": -1}, "passes[0].lora_rank: must be 0"),
        ({"pass": "scheduler", "version": 1}, "passes[0].version: unknown key"),
    ],
)
def test_bad_config_values_name_the_key(entry: dict, message: str) -> None:
    with pytest.raises(
        RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")
    ):
        parse_recipe({"passes": [entry]}, "r.yaml")


@pytest.mark.parametrize("cls", ALL)
def test_no_pass_declares_a_version_option(cls) -> None:
    assert "version" not in {f.name for f in dataclasses.fields(cls.Config)}


def test_passes_refuse_models_they_cannot_handle(teacher, adapter, data) -> None:
    embedded, _ = run_pass(
        GuidanceDistillPass(GuidanceDistillPass.Config(train_steps=1)), teacher, adapter, data
    )
    with pytest.raises(PlanError, match="needs classifier-free guidance"):
        AdaptiveGuidancePass().plan(plan_state(embedded, adapter))
    with pytest.raises(PlanError, match="must use classifier-free guidance"):
        GuidanceDistillPass().plan(plan_state(embedded, adapter))
    pd = ProgressiveDistillPass(ProgressiveDistillPass.Config(final_steps=3))  # model samples 4 steps
    with pytest.raises(PlanError, match="set start_steps"):
        pd.plan(plan_state(teacher, adapter))


@pytest.mark.parametrize("cls", ALL)
def test_every_pass_refuses_a_model_that_is_not_a_diffusion_model(cls, adapter) -> None:
    with pytest.raises(PlanError, match=rf"{cls.name}: needs a diffusion model .* got Sequential"):
        cls().plan(plan_state(nn.Sequential(nn.Linear(2, 2)), adapter))


def test_guidance_distill_twice_is_refused_at_plan_time(teacher, adapter) -> None:
    with pytest.raises(PlanError, match="must use classifier-free guidance"):
        plan_passes(plan_state(teacher, adapter), [GuidanceDistillPass(), GuidanceDistillPass()])
