"""What the diffusion passes read from the plan, and the sampling a distilled student leaves.

Every diffusion pass judges ``PlanState.diffusion`` (the sampling as the passes before it
leave it: steps, sampler, guidance), not the model as loaded, so a ``scheduler`` after
``consistency_distill`` sees the LCM student and an ``adaptive_guidance`` after
``guidance_distill`` sees the embedded guidance.
"""

from __future__ import annotations

import dataclasses

from compressor.errors import PlanError
from compressor.planning import DiffusionPlan, PlanState


def require_diffusion(state: PlanState, what: str) -> DiffusionPlan:
    """The planned sampling of a diffusion model; refuses any other model."""
    if state.diffusion is None:
        raise PlanError(
            f"{what}: needs a diffusion model (model.adapter: diffusers), got {type(state.model).__name__}"
        )
    return state.diffusion


def student_plan(teacher: DiffusionPlan, sampler: str, steps: int) -> DiffusionPlan:
    """The sampling of a distilled student (``training.make_student``): its own sampler and
    steps; a classifier-free-guided teacher's scale is baked in (guidance "none", 1 NFE)."""
    guidance = "none" if teacher.guidance == "cfg" else teacher.guidance
    return dataclasses.replace(teacher, sampler=sampler, steps=steps, guidance=guidance)
