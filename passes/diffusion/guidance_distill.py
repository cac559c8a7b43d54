"""``guidance_distill``: one network evaluation reproduces classifier-free guidance.

Meng et al., "On Distillation of Guided Diffusion Models" (CVPR 2023), stage one: the
student learns ``eps_u + w (eps_c - eps_u)`` in one evaluation; the scale w is an input,
embedded by Fourier features and a zero-initialised MLP. Halves the NFE at the same step
count; the student samples with guidance "embedded" and hands its w embedding on to any
later step-reduction pass.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from compressor.config import option
from compressor.errors import PassError, PlanError, RecipeError
from compressor.passes.diffusion.diffusion_plan import require_diffusion
from compressor.passes.diffusion.train_options import TrainOptions
from compressor.passes.diffusion.training import fit, loss_summary, minibatches
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import PlanState

if TYPE_CHECKING:
    from compressor.adapters.base import DataSplits
    from compressor.adapters.diffusion.model import DiffusionModel
    from compressor.progress import Progress


@dataclass(frozen=True)
class GuidanceDistillConfig(TrainOptions):
    guidance_min: float = option(1.0, help="lowest guidance scale w sampled during training", le=100.0)
    guidance_max: float = option(4.0, help="highest guidance scale w sampled during training", le=100.0)

    def validate(self, path: str) -> None:
        self.check_train(path)
        if not 0.0 <= self.guidance_min <= self.guidance_max:
            raise RecipeError(
                f"{path}.guidance_min/guidance_max: need 0 <= guidance_min <= guidance_max, "
                f"got {self.guidance_min}, {self.guidance_max}"
            )


def accept_class_vector_(unet: nn.Module) -> None:
    """Give a UNet2DConditionModel without a class embedding an identity one, so the guidance
    embedding can be added to its time embedding as ``class_labels`` (a plain diffusers
    option: the folder reloads with ``class_embed_type: identity``)."""
    if getattr(unet, "class_embedding", None) is None:
        unet.class_embedding = nn.Identity()
        unet.register_to_config(class_embed_type="identity")  # type: ignore[operator]


def guidance_student(model: DiffusionModel) -> DiffusionModel:
    """A trainable copy of ``model`` whose conditioner also embeds the guidance scale w (its new
    MLP zero-initialised, every other weight the teacher's)."""
    student = copy.deepcopy(model)
    old = student.conditioner
    cond = type(old)(**{**dict(old.config), "guidance_embedding": True, "guidance": "embedded"})
    missing, unexpected = cond.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_mlp.") for k in missing), (missing, unexpected)
    student.conditioner = cond
    if cond.config.get("guidance_target", "class_labels") == "class_labels":
        accept_class_vector_(student.unet)
    return student.with_spec(guidance="embedded", adaptive_guidance_threshold=None).train()


def guidance_distill(
    model: DiffusionModel,
    data: DataSplits,
    cfg: GuidanceDistillConfig,
    seed: int,
    bar: Progress | None = None,
) -> tuple[DiffusionModel, list[float]]:
    """Meng et al. stage one: eps_student(x, t, c, w) ~ eps_u + w (eps_c - eps_u), w ~ U[min, max]."""
    from compressor.adapters.digits import NULL_LABEL

    teacher = model
    student = guidance_student(model)
    sch = model.schedule
    batches = minibatches(data, cfg.batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        x0, y = next(batches)
        b = x0.shape[0]
        t = torch.randint(0, teacher.num_train_timesteps, (b,), generator=g)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(b, generator=g)
        x = sch.add_noise(x0, t, torch.randn(x0.shape, generator=g))
        tm = sch.model_t(t)
        with torch.no_grad():
            both = teacher(
                torch.cat([x, x]), torch.cat([tm, tm]), torch.cat([y, torch.full_like(y, NULL_LABEL)])
            )
            out_c, out_u = both[:b], both[b:]
            target = out_u + w.view(-1, 1, 1, 1) * (out_c - out_u)
        return nn.functional.mse_loss(student(x, tm, y, w), target)

    losses = fit(
        student, loss_fn, cfg.train_steps, cfg.lr, "guidance_distill", lora_rank=cfg.lora_rank, bar=bar
    )
    return student.eval().requires_grad_(False), losses


@register_pass
class GuidanceDistillPass(Pass[GuidanceDistillConfig]):
    name = "guidance_distill"
    description = "one evaluation reproduces classifier-free guidance at scale w (w embedded); halves NFE"
    Config = GuidanceDistillConfig

    def plan(self, state: PlanState) -> PlanState:
        """Needs a classifier-free-guided model whose denoiser can take a w embedding; leaves it
        sampling the same steps with the guidance embedded (one evaluation per step)."""
        d = require_diffusion(state, self.name)
        if d.guidance != "cfg" or d.guidance_embedded:
            raise PlanError(f"{self.name}: the model must use classifier-free guidance (guidance: cfg)")
        if not d.accepts_guidance:
            raise PlanError(
                f"{self.name}: a {type(state.model.unet).__name__} embeds its class inside every block, "
                "with no input to add a guidance-scale embedding to; progressive_distill and "
                "consistency_distill bake the CFG scale into the student instead"
            )
        return state.replace(diffusion=dataclasses.replace(d, guidance="embedded", guidance_embedded=True))

    def run(self, model: Any, ctx: PassContext) -> PassOutput:
        with ctx.progress_bar(self.name, self.config.train_steps) as bar:
            student, losses = guidance_distill(model, ctx.data, self.config, ctx.seed, bar)
        return PassOutput(student, {"loss": loss_summary(losses)})

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        model = cast("DiffusionModel", out.model)
        if not (model.guidance_embedded and model.spec.guidance == "embedded"):
            raise PassError(f"{self.name}: the student does not embed the guidance scale")
