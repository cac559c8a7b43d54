"""``progressive_distill``: rounds of distillation, each halving the sampling steps.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR
2022): in each round one deterministic DDIM step of the student matches two of its
teacher; each round halves the step count and the student of one round is the teacher
of the next. A classifier-free-guided teacher is distilled into a student with the
scale baked in (one evaluation per step, guidance "none").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from compressor.adapters.diffusion.schedule import ddim_grid
from compressor.config import option
from compressor.errors import PassError, PlanError, RecipeError
from compressor.passes.diffusion.diffusion_plan import require_diffusion, student_plan
from compressor.passes.diffusion.train_options import TrainOptions
from compressor.passes.diffusion.training import (
    fit,
    guided_at,
    loss_summary,
    make_student,
    minibatches,
    teacher_out,
)
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import PlanState

if TYPE_CHECKING:
    from compressor.adapters.base import DataSplits
    from compressor.adapters.diffusion.model import DiffusionModel
    from compressor.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressiveDistillConfig(TrainOptions):
    train_steps: int = option(200, help="optimizer steps per halving round")
    final_steps: int = option(4, help="sampling steps of the final student", le=1000)
    start_steps: int | None = option(
        None, help="DDIM steps of the first teacher; null = the steps the model already samples with", le=1000
    )

    def validate(self, path: str) -> None:
        self.check_train(path)
        if self.final_steps < 1:
            raise RecipeError(f"{path}.final_steps: must be at least 1, got {self.final_steps}")
        if self.start_steps is not None:
            check_halvings(self.start_steps, self.final_steps, f"{path}.start_steps")


def check_halvings(start: int, final: int, what: str) -> int:
    """The number of halving rounds from ``start`` to ``final`` steps (at least one)."""
    rounds = math.log2(start / final) if start >= final else -1.0
    if rounds < 1 or rounds != int(rounds):
        raise RecipeError(f"{what}: {start} is not final_steps ({final}) times a power of two >= 2")
    return int(rounds)


def progressive_round(
    teacher: DiffusionModel,
    data: DataSplits,
    steps: int,
    cfg: ProgressiveDistillConfig,
    seed: int,
    bar: Progress | None = None,
) -> tuple[DiffusionModel, list[float]]:
    """One round: the student's DDIM step t_i -> t_{i+1} on the ``steps`` grid matches two
    teacher DDIM steps on the 2x grid (t_i -> midpoint -> t_{i+1}); loss in the model's
    output space (epsilon, or velocity for flow models, where DDIM is the Euler step)."""
    teacher = teacher.with_spec(sampler="ddim", steps=2 * steps).eval()
    student = make_student(teacher, sampler="ddim", steps=steps)
    fine, coarse = (
        ddim_grid(teacher.num_train_timesteps, 2 * steps),
        ddim_grid(teacher.num_train_timesteps, steps),
    )
    t_hi = torch.tensor(coarse)
    t_mid = torch.tensor(fine[1::2])  # (steps,) the teacher's midpoint of each student step
    t_lo = torch.tensor([*coarse[1:], -1])
    sch = teacher.schedule
    batches = minibatches(data, cfg.batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        x0, y = next(batches)
        i = torch.randint(0, steps, (x0.shape[0],), generator=g)
        t, tm, tn = t_hi[i], t_mid[i], t_lo[i]
        x = sch.add_noise(x0, t, torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            xm = sch.step(x, teacher_out(teacher, x, t, y), t, tm)
            x2 = sch.step(xm, teacher_out(teacher, xm, tm, y), tm, tn)
            target = sch.output_for_target(x, x2, t, tn)
        return nn.functional.mse_loss(guided_at(student, x, t, y), target)

    losses = fit(
        student,
        loss_fn,
        cfg.train_steps,
        cfg.lr,
        f"progressive_distill ({2 * steps}->{steps})",
        lora_rank=cfg.lora_rank,
        bar=bar,
    )
    return student.eval().requires_grad_(False), losses


@register_pass
class ProgressiveDistillPass(Pass[ProgressiveDistillConfig]):
    name = "progressive_distill"
    description = "rounds of teacher-to-student distillation, each halving the DDIM step count"
    Config = ProgressiveDistillConfig

    def plan(self, state: PlanState) -> PlanState:
        """Needs start steps (``start_steps``, else the steps the passes before leave) that halve
        down to ``final_steps``; leaves a DDIM student at ``final_steps``, guidance baked in."""
        d = require_diffusion(state, self.name)
        start = self.config.start_steps or d.steps
        try:
            check_halvings(start, self.config.final_steps, f"{self.name}: start steps")
        except RecipeError as e:
            raise PlanError(f"{e}; set start_steps") from None
        return state.replace(diffusion=student_plan(d, "ddim", self.config.final_steps))

    def run(self, model: Any, ctx: PassContext) -> PassOutput:
        steps = self.config.start_steps or model.spec.steps
        rounds = []
        while steps > self.config.final_steps:
            steps //= 2
            with ctx.progress_bar(f"{self.name} {2 * steps}->{steps} steps", self.config.train_steps) as bar:
                model, losses = progressive_round(model, ctx.data, steps, self.config, ctx.seed + steps, bar)
            rounds.append({"steps": steps, **loss_summary(losses)})
            log.info("progressive_distill: %d-step student, loss %s", steps, rounds[-1])
        return PassOutput(model, {"rounds": rounds})

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        spec = cast("DiffusionModel", out.model).spec
        if spec.steps != self.config.final_steps or spec.guidance == "cfg":
            raise PassError(
                f"{self.name}: the student samples {spec.steps} steps with {spec.guidance} guidance"
            )
