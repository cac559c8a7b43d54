"""adaptive_guidance: the unconditional evaluation stops once it agrees with the conditional."""

from __future__ import annotations

import pytest

from compressor.errors import PlanError
from compressor.passes.diffusion.adaptive_guidance import AdaptiveGuidancePass
from compressor.passes.diffusion.guidance_distill import GuidanceDistillPass
from compressor.passes.diffusion.progressive_distill import ProgressiveDistillPass
from compressor.planning import plan_passes
from tests.helpers.diffusion import nfe_of, plan_state, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


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


@pytest.mark.parametrize(
    ("before", "guidance"),
    [
        (GuidanceDistillPass(), "'embedded'"),
        (ProgressiveDistillPass(ProgressiveDistillPass.Config(final_steps=2)), "'none'"),
    ],
)
def test_adaptive_guidance_judges_the_guidance_a_pass_before_leaves(
    teacher, adapter, before, guidance
) -> None:
    state = plan_state(teacher, adapter)
    assert AdaptiveGuidancePass().plan(state) == state  # the teacher samples with cfg
    with pytest.raises(PlanError, match=f"samples with guidance {guidance}; adaptive guidance needs"):
        plan_passes(state, [before, AdaptiveGuidancePass()])
