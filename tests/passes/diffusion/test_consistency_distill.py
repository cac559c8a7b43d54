"""consistency_distill: an LCM (or segmented, DDIM) student that samples in N steps."""

from __future__ import annotations

import pytest

from compressor.adapters.diffusion.model import DiffusionModel
from compressor.adapters.diffusion.schedule import make_scheduler
from compressor.config import from_dict
from compressor.errors import PlanError
from compressor.passes.diffusion.consistency_distill import ConsistencyDistillPass
from tests.helpers.diffusion import nfe_of, plan_state, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


def timesteps_of(model: DiffusionModel) -> int:
    return len(make_scheduler(model.train_config, model.spec).timesteps)


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


def test_consistency_distill_refuses_a_solver_grid_that_does_not_divide_training(teacher, adapter) -> None:
    cd = ConsistencyDistillPass(ConsistencyDistillPass.Config(original_inference_steps=300))
    with pytest.raises(PlanError, match="original_inference_steps 300 must divide the teacher's 1000"):
        cd.plan(plan_state(teacher, adapter))
