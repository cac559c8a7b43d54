"""``adaptive_guidance``: classifier-free guidance that switches itself off.

Classifier-free guidance spends two evaluations per step, but late in sampling the
conditional and unconditional predictions agree. Following Castillo et al. ("Adaptive
Guidance: Training-free Acceleration of Conditional Diffusion Models", 2023), once
cosine(eps_c, eps_u) of a sample passes a threshold, its unconditional evaluation is
dropped for the remaining steps. Training-free: only the sampling spec changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.config import option
from compressor.errors import PlanError, RecipeError
from compressor.passes.diffusion.diffusion_plan import require_diffusion
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import PlanState


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

    def validate(self, path: str) -> None:
        if not -1.0 < self.threshold <= 1.0:
            raise RecipeError(f"{path}.threshold: must be in (-1, 1], got {self.threshold}")
        if not 0.0 <= self.warmup <= 1.0:
            raise RecipeError(f"{path}.warmup: must be in [0, 1], got {self.warmup}")


@register_pass
class AdaptiveGuidancePass(Pass[AdaptiveGuidanceConfig]):
    name = "adaptive_guidance"
    description = (
        "training-free: stop evaluating the unconditional branch once it agrees with the conditional"
    )
    Config = AdaptiveGuidanceConfig

    def plan(self, state: PlanState) -> PlanState:
        """Needs classifier-free guidance as the passes before leave it (not a guidance-distilled
        or guidance-baked student); the steps, sampler and guidance stay as they are."""
        d = require_diffusion(state, self.name)
        if d.guidance != "cfg":
            raise PlanError(
                f"{self.name}: the model samples with guidance {d.guidance!r}; "
                "adaptive guidance needs classifier-free guidance (two evaluations per step)"
            )
        return state

    def run(self, model: Any, ctx: PassContext) -> PassOutput:
        changed = model.with_spec(
            adaptive_guidance_threshold=self.config.threshold, adaptive_guidance_warmup=self.config.warmup
        )
        return PassOutput(changed)
