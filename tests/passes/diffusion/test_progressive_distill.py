"""progressive_distill: each round halves the steps; the plan judges the steps the passes before leave."""

from __future__ import annotations

import pytest
import torch

from compressor.adapters.diffusion.model import DiffusionModel
from compressor.adapters.diffusion.schedule import make_scheduler
from compressor.config import from_dict
from compressor.errors import PlanError
from compressor.passes.diffusion.progressive_distill import ProgressiveDistillPass
from compressor.passes.diffusion.scheduler import SchedulerPass
from compressor.planning import plan_passes
from tests.helpers.diffusion import nfe_of, plan_state, run_pass, tiny_teacher

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


def test_progressive_distill_halves_steps_per_round(teacher, adapter, data) -> None:
    cfg = from_dict(
        ProgressiveDistillPass.Config, {"start_steps": 8, "final_steps": 2, "train_steps": 3}, "p"
    )
    student, out = run_pass(ProgressiveDistillPass(cfg), teacher, adapter, data)
    assert [r["steps"] for r in out.details["rounds"]] == [4, 2]
    assert student.spec.sampler == "ddim" and timesteps_of(student) == 2
    assert nfe_of(student) == 2  # guidance baked in: one evaluation per step
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))


def test_progressive_distill_refuses_steps_that_do_not_halve_to_final(teacher, adapter) -> None:
    pd = ProgressiveDistillPass(ProgressiveDistillPass.Config(final_steps=3))  # model samples 4 steps
    with pytest.raises(PlanError, match="set start_steps"):
        pd.plan(plan_state(teacher, adapter))


def test_progressive_distill_judges_the_steps_a_pass_before_leaves(teacher, adapter) -> None:
    state = plan_state(teacher, adapter)  # the model samples 4 steps: 4 -> 2 would do
    to_two = ProgressiveDistillPass(ProgressiveDistillPass.Config(final_steps=2))
    with pytest.raises(PlanError, match=r"3 is not final_steps \(2\).*set start_steps"):
        plan_passes(state, [SchedulerPass(SchedulerPass.Config(solver="ddim", steps=3)), to_two])
    rounds = [to_two, ProgressiveDistillPass(ProgressiveDistillPass.Config(final_steps=1))]
    final = plan_passes(state, rounds)[-1].diffusion
    assert final is not None
    assert (final.steps, final.sampler, final.guidance) == (1, "ddim", "none")
