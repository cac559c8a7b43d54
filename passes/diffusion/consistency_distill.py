"""``consistency_distill``: a student that samples in 1, 2 or 4 steps.

Luo et al., "Latent Consistency Models" (2023): a consistency function
``f(x_t, t) = c_skip x_t + c_out x0(x_t, t)`` trained with a skipping-step DDIM solver of
the teacher and an EMA target network, sampled by the LCM multistep scheduler at 1/2/4
steps. ``segments > 1`` trains trajectory-segmented consistency instead (Ren et al.,
"Hyper-SD", 2024): the map goes to the lower edge of the segment holding t, and the
student samples with DDIM at ``segments`` steps. A classifier-free-guided teacher is
distilled into a student with the scale baked in (guidance "none").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

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
    from compressor.adapters.diffusion.schedule import NoiseSchedule
    from compressor.progress import Progress


@dataclass(frozen=True)
class ConsistencyDistillConfig(TrainOptions):
    train_steps: int = option(600, help="optimizer steps")
    lr: float = option(1e-4, help="AdamW learning rate", gt=0.0, le=1.0)
    sampling_steps: int = option(
        4, help="steps the student samples with (1, 2, 4 ... up to the solver grid)", le=1000
    )
    original_inference_steps: int = option(
        50,
        help="the skipping-step solver grid: one teacher DDIM step skips num_train_timesteps / this",
        ge=1,
        le=1000,
    )
    segments: int = option(
        1,
        help="1 = LCM consistency to the clean image; >1 = Hyper-SD trajectory segments (samples with DDIM)",
        le=1000,
    )
    ema_decay: float = option(0.95, help="EMA decay of the target network (LCM uses 0.95)", le=1.0)
    loss: Literal["l2", "huber"] = option("huber", help="distance between online and target outputs")
    huber_c: float = option(0.001, help="pseudo-Huber constant", gt=0.0, le=1.0)

    def validate(self, path: str) -> None:
        self.check_train(path)
        if not 1 <= self.sampling_steps <= self.original_inference_steps:
            raise RecipeError(
                f"{path}.sampling_steps: must be between 1 and original_inference_steps "
                f"({self.original_inference_steps}), got {self.sampling_steps}"
            )
        if self.segments < 1:
            raise RecipeError(f"{path}.segments: must be at least 1, got {self.segments}")
        if self.segments > 1 and self.segments != self.sampling_steps:
            raise RecipeError(f"{path}.segments: a {self.segments}-segment student samples with exactly "
                              f"{self.segments} steps; set sampling_steps: {self.segments}")  # fmt: skip
        if not 0.0 <= self.ema_decay < 1.0:
            raise RecipeError(f"{path}.ema_decay: must be in [0, 1), got {self.ema_decay}")

    def student_sampling(self) -> tuple[str, int]:
        """(sampler, steps) the student samples with: LCM, or DDIM over the segments."""
        return ("lcm", self.sampling_steps) if self.segments == 1 else ("ddim", self.segments)


def consistency_map(
    x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, edge: torch.Tensor, sch: NoiseSchedule
) -> torch.Tensor:
    """Where the consistency function sends x_t: the boundary form c_skip x + c_out x0 when
    the segment edge is the clean end (edge = -1), else the deterministic step to the edge."""
    x0, _ = sch.x0_eps(out, x, t)
    c_skip, c_out = sch.boundary_scalings(t)
    to_clean = c_skip * x + c_out * x0
    to_edge = sch.step(x, out, t, edge, clip=False)
    return torch.where((edge < 0).view(-1, 1, 1, 1), to_clean, to_edge)


def consistency_distill(
    model: DiffusionModel,
    data: DataSplits,
    cfg: ConsistencyDistillConfig,
    seed: int,
    bar: Progress | None = None,
) -> tuple[DiffusionModel, list[float]]:
    """LCM: || f_theta(x_{t}, t) - f_ema(DDIM_teacher(x_t, t -> t - k), t - k) ||, t on the skip grid."""
    teacher = model.eval()
    sampler, steps = cfg.student_sampling()
    extra = {"original_inference_steps": cfg.original_inference_steps} if sampler == "lcm" else {}
    student = make_student(model, sampler=sampler, steps=steps, **extra)
    # LoRA (as in LCM-LoRA) has no EMA copy: the target is the student itself under no_grad
    target_net = student if cfg.lora_rank else copy.deepcopy(student).eval().requires_grad_(False)
    n_train = teacher.num_train_timesteps
    skip = n_train // cfg.original_inference_steps
    grid = torch.arange(1, cfg.original_inference_steps + 1) * skip - 1  # LCM's origin timesteps
    edges = (
        torch.tensor([*ddim_grid(n_train, cfg.segments)[1:], -1]) if cfg.segments > 1 else torch.tensor([-1])
    )
    sch = teacher.schedule
    batches = minibatches(data, cfg.batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        x0, y = next(batches)
        t = grid[torch.randint(0, grid.numel(), (x0.shape[0],), generator=g)]
        # the lower edge of each t's segment: the largest edge strictly below t
        edge = torch.stack([edges[edges < ti].max() for ti in t])
        t_prev = torch.maximum(t - skip, edge)
        x = sch.add_noise(x0, t, torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            x_prev = sch.step(x, teacher_out(teacher, x, t, y), t, t_prev, clip=False)
            at_edge = (t_prev == edge).view(-1, 1, 1, 1)
            tgt_out = guided_at(target_net, x_prev, t_prev.clamp(min=0), y)
            target = torch.where(at_edge, x_prev, consistency_map(x_prev, tgt_out, t_prev, edge, sch))
        online = consistency_map(x, guided_at(student, x, t, y), t, edge, sch)
        if cfg.loss == "l2":
            return nn.functional.mse_loss(online, target)
        return (((online - target) ** 2).flatten(1).sum(1) + cfg.huber_c**2).sqrt().mean() - cfg.huber_c

    def ema_update(step: int) -> None:
        if target_net is student:
            return
        with torch.no_grad():
            for pt, ps in zip(target_net.parameters(), student.parameters()):
                pt.lerp_(ps, 1.0 - cfg.ema_decay)

    losses = fit(
        student, loss_fn, cfg.train_steps, cfg.lr, "consistency_distill", ema_update, cfg.lora_rank, bar
    )
    return student.eval().requires_grad_(False), losses


@register_pass
class ConsistencyDistillPass(Pass[ConsistencyDistillConfig]):
    name = "consistency_distill"
    description = "latent-consistency distillation (skipping-step DDIM solver, EMA target); 1-4 step sampling"
    Config = ConsistencyDistillConfig

    def plan(self, state: PlanState) -> PlanState:
        """Needs a solver grid that divides the training timesteps; leaves an LCM student at
        ``sampling_steps`` (DDIM at ``segments`` when segmented), guidance baked in."""
        d = require_diffusion(state, self.name)
        n_train = d.num_train_timesteps
        if n_train % self.config.original_inference_steps:
            raise PlanError(
                f"{self.name}: original_inference_steps {self.config.original_inference_steps} must divide "
                f"the teacher's {n_train} training timesteps"
            )
        return state.replace(diffusion=student_plan(d, *self.config.student_sampling()))

    def run(self, model: Any, ctx: PassContext) -> PassOutput:
        with ctx.progress_bar(self.name, self.config.train_steps) as bar:
            student, losses = consistency_distill(model, ctx.data, self.config, ctx.seed, bar)
        return PassOutput(student, {"loss": loss_summary(losses)})

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        spec = cast("DiffusionModel", out.model).spec
        want = self.config.sampling_steps
        if spec.steps != want or spec.guidance == "cfg":
            raise PassError(
                f"{self.name}: the student samples {spec.steps} steps ({spec.guidance}), expected {want}"
            )
