"""scheduler: a training-free solver swap; refused on a consistency student."""

from __future__ import annotations

import pytest

from compressor.adapters.diffusion.model import DiffusionModel
from compressor.adapters.diffusion.schedule import make_scheduler
from compressor.errors import PlanError
from compressor.passes.diffusion.consistency_distill import ConsistencyDistillPass
from compressor.passes.diffusion.scheduler import SchedulerPass
from compressor.planning import plan_passes
from tests.helpers.diffusion import nfe_of, plan_state, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


def timesteps_of(model: DiffusionModel) -> int:
    return len(make_scheduler(model.train_config, model.spec).timesteps)


@pytest.mark.parametrize("solver", ["dpmsolver++", "unipc"])
def test_scheduler_pass_is_training_free(teacher, adapter, data, solver: str) -> None:
    out, _ = run_pass(SchedulerPass(SchedulerPass.Config(solver=solver, steps=3)), teacher, adapter, data)
    assert out.spec.sampler == solver and timesteps_of(out) == 3 and nfe_of(out) == 6
    assert out.unet is teacher.unet  # same weights


def test_scheduler_after_consistency_distill_is_refused_at_plan_time(teacher, adapter) -> None:
    passes = [ConsistencyDistillPass(), SchedulerPass()]
    with pytest.raises(PlanError, match="a consistency student must keep its LCM scheduler"):
        plan_passes(plan_state(teacher, adapter), passes)
