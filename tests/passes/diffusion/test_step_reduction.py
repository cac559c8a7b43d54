"""Each step-reduction pass: the student's NFE and scheduler steps are what the pass claims."""

from __future__ import annotations

import pytest
import torch

from compressor.adapters.diffusion.model import DiffusionModel
from compressor.adapters.diffusion.schedule import make_scheduler
from compressor.config import from_dict
from compressor.errors import PassError, RecipeError
from compressor.passes.diffusion.schedulers import AdaptiveGuidancePass, SchedulerPass
from compressor.passes.diffusion.step_reduction import (
    ConsistencyDistillPass,
    GuidanceDistillPass,
    ProgressiveDistillPass,
)
from compressor.pipeline import MetricsInstrument, Pipeline
from compressor.recipe import parse_recipe
from tests.helpers.diffusion import make_ctx, nfe_of, run_pass, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


def timesteps_of(model: DiffusionModel) -> int:
    return len(make_scheduler(model.train_config, model.spec).timesteps)


def test_output_for_target_inverts_a_ddim_step() -> None:
    sch = tiny_teacher().schedule
    x = torch.randn(5, 1, 8, 8)
    eps = torch.randn(5, 1, 8, 8)
    t, tn = torch.tensor([999, 700, 400, 100, 30]), torch.tensor([700, 400, 100, -1, -1])
    target = sch.step(x, eps, t, tn, clip=False)
    torch.testing.assert_close(sch.output_for_target(x, target, t, tn), eps, atol=1e-3, rtol=1e-3)


def test_guidance_distill_halves_nfe_and_learns_the_cfg_combination(teacher, adapter, data) -> None:
    assert nfe_of(teacher) == 8  # 4 DDIM steps x (cond + uncond)
    cfg = from_dict(GuidanceDistillPass.Config, {"train_steps": 40, "lr": 1e-3, "batch_size": 32}, "p")
    student, ctx = run_pass(GuidanceDistillPass(cfg), teacher, adapter, data)
    assert nfe_of(student) == 4 and timesteps_of(student) == 4
    # the student at w matches eps_u + w (eps_c - eps_u) better than its zero-initialised start
    x0 = data.eval[0]["images"][:16]
    y = data.eval[0]["labels"][:16]
    t = torch.full((16,), 500)
    x = teacher.schedule.add_noise(x0, t, torch.randn_like(x0))
    with torch.no_grad():
        target = teacher.guided(x, t, y)[0]
        before = (teacher(x, t, y) - target).pow(2).mean()
        after = (student(x, t, y, torch.full((16,), 2.0)) - target).pow(2).mean()
    assert after < 0.8 * before
    assert ctx.details["loss"]["loss_last"] < ctx.details["loss"]["loss_first"]


def test_progressive_distill_halves_steps_per_round(teacher, adapter, data) -> None:
    cfg = from_dict(
        ProgressiveDistillPass.Config, {"start_steps": 8, "final_steps": 2, "train_steps": 3}, "p"
    )
    student, ctx = run_pass(ProgressiveDistillPass(cfg), teacher, adapter, data)
    assert [r["steps"] for r in ctx.details["rounds"]] == [4, 2]
    assert student.spec.sampler == "ddim" and timesteps_of(student) == 2
    assert nfe_of(student) == 2  # guidance baked in: one evaluation per step
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_distill_samples_in_n_steps(teacher, adapter, data, steps: int) -> None:
    cfg = from_dict(ConsistencyDistillPass.Config, {"sampling_steps": steps, "train_steps": 2}, "p")
    student, _ = run_pass(ConsistencyDistillPass(cfg), teacher, adapter, data)
    assert student.spec.sampler == "lcm" and timesteps_of(student) == steps
    assert nfe_of(student) == steps


def test_consistency_trajectory_segments_sample_with_ddim(teacher, adapter, data) -> None:
    cfg = from_dict(
        ConsistencyDistillPass.Config, {"sampling_steps": 2, "segments": 2, "train_steps": 2}, "p"
    )
    student, _ = run_pass(ConsistencyDistillPass(cfg), teacher, adapter, data)
    assert student.spec.sampler == "ddim" and nfe_of(student) == 2


@pytest.mark.parametrize("solver", ["dpmsolver++", "unipc"])
def test_scheduler_pass_is_training_free(teacher, adapter, data, solver: str) -> None:
    out, _ = run_pass(SchedulerPass(SchedulerPass.Config(solver=solver, steps=3)), teacher, adapter, data)
    assert out.spec.sampler == solver and timesteps_of(out) == 3 and nfe_of(out) == 6
    assert out.unet is teacher.unet  # same weights


def test_adaptive_guidance_drops_uncond_evaluations(teacher, adapter, data) -> None:
    never, _ = run_pass(
        AdaptiveGuidancePass(AdaptiveGuidancePass.Config(threshold=1.0)), teacher, adapter, data
    )
    assert nfe_of(never) == 8
    # threshold below any cosine, no warmup: every sample drops uncond after the first step
    always = AdaptiveGuidancePass(AdaptiveGuidancePass.Config(threshold=-0.999, warmup=0.0))
    assert nfe_of(run_pass(always, teacher, adapter, data)[0]) == 4 + 1
    # warmup 0.5 of 4 steps: steps 1-2 always guided, the decision at step 2 drops uncond for 3-4
    half = AdaptiveGuidancePass(AdaptiveGuidancePass.Config(threshold=-0.999, warmup=0.5))
    assert nfe_of(run_pass(half, teacher, adapter, data)[0]) == 2 + 2 + 1 + 1


def test_composed_pipeline_measures_each_student(teacher, adapter, data) -> None:
    passes = [
        GuidanceDistillPass(GuidanceDistillPass.Config(train_steps=2)),
        ConsistencyDistillPass(ConsistencyDistillPass.Config(sampling_steps=2, train_steps=2)),
    ]
    pipe = Pipeline(passes, [MetricsInstrument()])
    out = pipe.run(teacher, make_ctx(teacher, adapter, data))
    nfes = [r.metrics["nfe"] for r in pipe.results]
    assert nfes == [8.0, 4.0, 2.0]
    assert out.guidance_embedded and out.spec.sampler == "lcm"
    assert all(0.0 <= r.metrics["class_acc"] <= 1.0 and r.metrics["fd"] > 0 for r in pipe.results)


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
    ],
)
def test_bad_config_values_name_the_key(entry: dict, message: str) -> None:
    with pytest.raises(
        RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")
    ):
        parse_recipe({"passes": [entry]}, "r.yaml")


def test_passes_refuse_models_they_cannot_handle(teacher, adapter, data) -> None:
    embedded, _ = run_pass(
        GuidanceDistillPass(GuidanceDistillPass.Config(train_steps=1)), teacher, adapter, data
    )
    with pytest.raises(PassError, match="needs classifier-free guidance"):
        AdaptiveGuidancePass().requires(embedded, make_ctx(embedded, adapter, data))
    with pytest.raises(PassError, match="must use classifier-free guidance"):
        GuidanceDistillPass().requires(embedded, make_ctx(embedded, adapter, data))
    pd = ProgressiveDistillPass(ProgressiveDistillPass.Config(final_steps=3))  # model samples 4 steps
    with pytest.raises(PassError, match="set start_steps"):
        pd.requires(teacher, make_ctx(teacher, adapter, data))


@pytest.mark.parametrize("which", ["guidance_distill", "consistency_distill"])
def test_lora_option_trains_adapters_and_merges_them(teacher, adapter, data, which: str) -> None:
    pytest.importorskip("peft")
    from compressor.passes import PASSES

    cls = PASSES[which]
    cfg = from_dict(cls.Config, {"train_steps": 3, "lora_rank": 2, "lr": 1e-2}, "p")
    student, _ = run_pass(cls(cfg), teacher, adapter, data)
    assert not any("lora" in n for n, _ in student.named_parameters())  # merged back: a plain UNet2DModel
    conv = dict(student.unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    assert type(conv) is torch.nn.Conv2d
    before = dict(teacher.unet.named_parameters())["down_blocks.0.resnets.0.conv1.weight"]
    assert not torch.equal(conv.weight, before)  # the merged low-rank update changed the weight
    delta = (conv.weight - before).flatten(1)
    assert torch.linalg.matrix_rank(delta).item() <= 2
