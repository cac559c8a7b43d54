"""``scheduler``: training-free step reduction by a better ODE solver.

Swap the sampler for a high-order multistep solver at N steps: DPM-Solver++(2M) (Lu et
al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
2022), UniPC (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", NeurIPS 2023), or DDIM (Song et al., 2021). The denoiser is
untouched; only the sampling spec changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from compressor.config import option
from compressor.errors import PassError, PlanError, RecipeError
from compressor.passes.diffusion.diffusion_plan import require_diffusion
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import PlanState

if TYPE_CHECKING:
    from compressor.adapters.diffusion.model import DiffusionModel


@dataclass(frozen=True)
class SchedulerConfig:
    solver: Literal["dpmsolver++", "unipc", "ddim"] = option(
        "dpmsolver++", help="the diffusers scheduler: DPM-Solver++(2M), UniPC (order 2) or DDIM"
    )
    steps: int = option(8, help="sampling steps (1 to 1000)")

    def validate(self, path: str) -> None:
        if not 1 <= self.steps <= 1000:
            raise RecipeError(f"{path}.steps: must be between 1 and 1000, got {self.steps}")


@register_pass
class SchedulerPass(Pass[SchedulerConfig]):
    name = "scheduler"
    description = "training-free: sample with DPM-Solver++ / UniPC / DDIM at N steps"
    Config = SchedulerConfig

    def plan(self, state: PlanState) -> PlanState:
        """Refuses a consistency student (its map only holds on the LCM grid); leaves the model
        sampling with ``solver`` at ``steps``."""
        d = require_diffusion(state, self.name)
        if d.sampler == "lcm":
            raise PlanError(f"{self.name}: a consistency student must keep its LCM scheduler")
        changed = dataclasses.replace(d, sampler=self.config.solver, steps=self.config.steps)
        return state.replace(diffusion=changed)

    def run(self, model: Any, ctx: PassContext) -> PassOutput:
        return PassOutput(model.with_spec(sampler=self.config.solver, steps=self.config.steps))

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        from compressor.adapters.diffusion.schedule import make_scheduler

        model = cast("DiffusionModel", out.model)
        sched = make_scheduler(model.train_config, model.spec)
        if len(sched.timesteps) != self.config.steps:
            raise PassError(
                f"{self.name}: scheduler has {len(sched.timesteps)} timesteps, not {self.config.steps}"
            )
