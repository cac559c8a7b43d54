"""Training-free step reduction: a better ODE solver, and guidance that switches itself off.

- ``scheduler``: swap the sampler for a high-order multistep solver at N steps,
  DPM-Solver++(2M) (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of
  Diffusion Probabilistic Models", 2022) or UniPC (Zhao et al., "UniPC: A Unified
  Predictor-Corrector Framework for Fast Sampling of Diffusion Models", NeurIPS 2023),
  or DDIM (Song et al., 2021). The denoiser is untouched; only the sampling spec changes.
- ``adaptive_guidance``: classifier-free guidance spends two evaluations per step, but
  late in sampling the conditional and unconditional predictions agree. Following
  Castillo et al. ("Adaptive Guidance: Training-free Acceleration of Conditional
  Diffusion Models", 2023), once cosine(eps_c, eps_u) of a sample passes a threshold,
  its unconditional evaluation is dropped for the remaining steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from compressor.config import option
from compressor.errors import PassError, RecipeError
from compressor.passes.diffusion.step_reduction import _require_diffusion
from compressor.pipeline import Pass, PassContext, register_pass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    solver: Literal["dpmsolver++", "unipc", "ddim"] = option(
        "dpmsolver++", help="the diffusers scheduler: DPM-Solver++(2M), UniPC (order 2) or DDIM"
    )
    steps: int = option(8, help="sampling steps (1 to 1000)")
    version: int = option(1, help="config schema version")

    def validate(self, path: str) -> None:
        if not 1 <= self.steps <= 1000:
            raise RecipeError(f"{path}.steps: must be between 1 and 1000, got {self.steps}")


@register_pass
class SchedulerPass(Pass):
    name = "scheduler"
    description = "training-free: sample with DPM-Solver++ / UniPC / DDIM at N steps"
    Config = SchedulerConfig

    def check(self, model: Any, target: Any, adapter: Any) -> None:
        _require_diffusion(model, self.name)

    def requires(self, model: Any, ctx: PassContext) -> None:
        _require_diffusion(model, self.name)
        if model.spec.sampler == "lcm":
            raise PassError(f"{self.name}: a consistency student must keep its LCM scheduler")

    def run(self, model: Any, ctx: PassContext) -> nn.Module:
        return model.with_spec(sampler=self.config.solver, steps=self.config.steps)

    def ensures(self, model: Any, ctx: PassContext) -> None:
        from compressor.adapters.diffusion.schedule import make_scheduler

        sched = make_scheduler(model.train_config, model.spec)
        if len(sched.timesteps) != self.config.steps:
            raise PassError(
                f"{self.name}: scheduler has {len(sched.timesteps)} timesteps, not {self.config.steps}"
            )


@dataclass(frozen=True)
class AdaptiveGuidanceConfig:
    threshold: float = option(
        0.99,
        help="cosine similarity of eps_cond and eps_uncond above which a sample drops the uncond evaluation",
    )
    warmup: float = option(
        0.3,
        help="fraction of steps that are always guided: at pure noise both branches predict the input, "
        "so their cosine is ~1 before guidance has done anything",
    )
    version: int = option(1, help="config schema version")

    def validate(self, path: str) -> None:
        if not -1.0 < self.threshold <= 1.0:
            raise RecipeError(f"{path}.threshold: must be in (-1, 1], got {self.threshold}")
        if not 0.0 <= self.warmup <= 1.0:
            raise RecipeError(f"{path}.warmup: must be in [0, 1], got {self.warmup}")


@register_pass
class AdaptiveGuidancePass(Pass):
    name = "adaptive_guidance"
    description = (
        "training-free: stop evaluating the unconditional branch once it agrees with the conditional"
    )
    Config = AdaptiveGuidanceConfig

    def check(self, model: Any, target: Any, adapter: Any) -> None:
        _require_diffusion(model, self.name)

    def requires(self, model: Any, ctx: PassContext) -> None:
        _require_diffusion(model, self.name)
        if model.spec.guidance != "cfg":
            raise PassError(
                f"{self.name}: the model samples with guidance {model.spec.guidance!r}; "
                "adaptive guidance needs classifier-free guidance (two evaluations per step)"
            )

    def run(self, model: Any, ctx: PassContext) -> nn.Module:
        return model.with_spec(
            adaptive_guidance_threshold=self.config.threshold, adaptive_guidance_warmup=self.config.warmup
        )
