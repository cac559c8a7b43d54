"""guidance_distill: one evaluation per step reproduces the teacher's classifier-free guidance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compressor.adapters.diffusion.model import DiffusionModel
from compressor.adapters.diffusion.schedule import make_scheduler
from compressor.config import from_dict
from compressor.errors import PlanError
from compressor.passes.diffusion.guidance_distill import GuidanceDistillPass
from tests.helpers.diffusion import nfe_of, plan_state, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


def timesteps_of(model: DiffusionModel) -> int:
    return len(make_scheduler(model.train_config, model.spec).timesteps)


def test_guidance_distill_halves_nfe_and_learns_the_cfg_combination(teacher, adapter, data) -> None:
    assert nfe_of(teacher) == 8  # 4 DDIM steps x (cond + uncond)
    cfg = from_dict(GuidanceDistillPass.Config, {"train_steps": 40, "lr": 1e-3, "batch_size": 32}, "p")
    student, out = run_pass(GuidanceDistillPass(cfg), teacher, adapter, data)
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
    assert out.details["loss"]["loss_last"] < out.details["loss"]["loss_first"]


def test_guidance_distill_plans_embedded_guidance_at_the_same_steps(teacher, adapter) -> None:
    before = plan_state(teacher, adapter)
    after = GuidanceDistillPass().plan(before).diffusion
    assert before.diffusion is not None and after is not None
    assert (after.guidance, after.guidance_embedded) == ("embedded", True)
    assert (after.steps, after.sampler) == (before.diffusion.steps, before.diffusion.sampler)


def test_guidance_distill_refuses_a_denoiser_without_a_guidance_input(teacher, adapter) -> None:
    state = plan_state(teacher, adapter)
    assert state.diffusion is not None
    closed = state.replace(diffusion=dataclasses.replace(state.diffusion, accepts_guidance=False))
    with pytest.raises(PlanError, match="no input to add a guidance-scale embedding"):
        GuidanceDistillPass().plan(closed)
