"""Step reduction by distillation: fewer network evaluations per diffusion sample.

Three passes, each returning a *student* ``DiffusionModel`` (new denoiser weights plus a
sampling spec with its own step count), distilled from the model they are handed:

- ``guidance_distill`` (Meng et al., "On Distillation of Guided Diffusion Models",
  CVPR 2023, stage one): one evaluation reproduces classifier-free guidance
  ``eps_u + w (eps_c - eps_u)``; w is an input, embedded by Fourier features and a
  zero-initialised MLP. Halves the NFE at the same step count.
- ``progressive_distill`` (Salimans & Ho, "Progressive Distillation for Fast Sampling
  of Diffusion Models", ICLR 2022): rounds in which one deterministic DDIM step of the
  student matches two of its teacher; each round halves the step count and the
  student of one round is the teacher of the next.
- ``consistency_distill`` (Luo et al., "Latent Consistency Models", 2023): a
  consistency function ``f(x_t, t) = c_skip x_t + c_out x0(x_t, t)`` trained with a
  skipping-step DDIM solver of the teacher and an EMA target network, sampled by the
  LCM multistep scheduler at 1/2/4 steps. ``segments > 1`` trains trajectory-segmented
  consistency instead (Ren et al., "Hyper-SD", 2024): the map goes to the lower edge of
  the segment holding t, and the student samples with DDIM at ``segments`` steps.

The math (noising, DDIM steps, the targets) is the model's ``NoiseSchedule``
(``compressor.adapters.diffusion.schedule``), so the same passes distil epsilon-prediction (DDPM) and
flow-matching (velocity) denoisers, UNets and transformers alike; the Pass classes only
check the model, build the student and record what they did. Guidance is handled by
the teacher's own ``guided``: a classifier-free-guided teacher is
distilled into a student with the scale baked in (one evaluation per step, guidance
"none"); a guidance-embedded teacher hands its w embedding on to the student.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from compressor.adapters.diffusion.schedule import ddim_grid
from compressor.config import option
from compressor.errors import PassError, PlanError, RecipeError
from compressor.pipeline import Pass, PassContext, register_pass

if TYPE_CHECKING:
    from compressor.adapters.base import DataSplits
    from compressor.adapters.diffusion.model import DiffusionModel
    from compressor.adapters.diffusion.schedule import NoiseSchedule
    from compressor.progress import Progress

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- math


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


def minibatches(data: DataSplits, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random minibatches of (images, labels) from the real training split."""
    images = torch.cat([b["images"] for b in data.train])
    labels = torch.cat([b["labels"] for b in data.train])
    if images.shape[0] == 0:
        raise PassError("step reduction needs real training images (data.train is empty)")
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        yield images[idx], labels[idx]


def guided_at(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's guided output at integer training timesteps t."""
    return model.guided(x, model.schedule.model_t(t), labels)[0]


@torch.no_grad()
def teacher_out(
    teacher: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return guided_at(teacher, x, t, labels)


def make_student(model: DiffusionModel, **spec_changes: Any) -> DiffusionModel:
    """A trainable copy; a classifier-free-guided model becomes a guidance-baked one (1 NFE)."""
    student = copy.deepcopy(model)
    if model.spec.guidance == "cfg":
        spec_changes.setdefault("guidance", "none")
    spec_changes.setdefault("adaptive_guidance_threshold", None)
    return student.with_spec(**spec_changes).train().requires_grad_(True)


LORA_TARGETS = ("conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0")


def attach_lora_(unet: nn.Module, rank: int) -> None:
    """Freeze the denoiser and train rank-``rank`` LoRA adapters on its convs, projections
    and attention (Hu et al., 2021), through peft; for denoisers too large to fine-tune."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise PassError("lora_rank > 0 needs peft: pip install peft") from e
    unet.requires_grad_(False)
    names = [n for n, _ in unet.named_modules()]
    targets = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)


def merge_lora_(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; returns the count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from compressor.modules import set_module

    merged = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            set_module(model, name, m.get_base_layer())
            merged += 1
    return merged


def fit(
    student: nn.Module,
    loss_fn: Any,
    steps: int,
    lr: float,
    what: str,
    on_step: Any = None,
    lora_rank: int = 0,
    bar: Progress | None = None,
) -> list[float]:
    """Adam on ``loss_fn(step)``; returns the loss curve, raises on a non-finite loss.

    ``bar`` (from ``PassContext.progress_bar``) advances one tick per optimizer step.

    With ``lora_rank > 0`` only LoRA adapters on ``student.unet`` (and any new conditioner
    layers) train, and are merged back afterwards so the student is a plain denoiser.
    """
    if lora_rank > 0:
        attach_lora_(student.unet, lora_rank)  # type: ignore[arg-type]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise PassError(f"{what}: loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss={losses[-1]:.4g}")
    if lora_rank > 0:
        merge_lora_(student)
        student.requires_grad_(True)
    return losses


def _summary(losses: list[float]) -> dict[str, float]:
    k = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


# --------------------------------------------------------------------------- passes


def _require_diffusion(model: nn.Module, what: str) -> None:
    from compressor.adapters.diffusion.model import DiffusionModel

    if not isinstance(model, DiffusionModel):
        raise PlanError(
            f"{what}: needs a diffusion model (model.adapter: diffusers), got {type(model).__name__}"
        )


@dataclass(frozen=True)
class TrainOptions:
    """Shared training options (mixed into each distillation config)."""

    def _check_train(self, path: str) -> None:
        if self.lora_rank < 0:  # type: ignore[attr-defined]
            raise RecipeError(f"{path}.lora_rank: must be 0 (full fine-tuning) or positive")
        for name in ("train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:  # type: ignore[attr-defined]
            raise RecipeError(f"{path}.lr: must be positive, got {self.lr}")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class GuidanceDistillConfig(TrainOptions):
    train_steps: int = option(400, help="optimizer steps")
    batch_size: int = option(64, help="real images per step", le=65_536)
    lr: float = option(2e-4, help="AdamW learning rate", gt=0.0, le=1.0)
    guidance_min: float = option(1.0, help="lowest guidance scale w sampled during training", le=100.0)
    guidance_max: float = option(4.0, help="highest guidance scale w sampled during training", le=100.0)
    lora_rank: int = option(
        0,
        help="0 = fine-tune the whole denoiser; r > 0 = train rank-r LoRA adapters (peft), merged after",
        le=4096,
    )
    version: int = option(1, help="config schema version")

    def validate(self, path: str) -> None:
        self._check_train(path)
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
    student = copy.deepcopy(model)
    old = student.conditioner
    cond = type(old)(**{**dict(old.config), "guidance_embedding": True, "guidance": "embedded"})
    missing, unexpected = cond.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_mlp.") for k in missing), (missing, unexpected)
    student.conditioner = cond
    if cond.config.get("guidance_target", "class_labels") == "class_labels":
        accept_class_vector_(student.unet)
    student = student.with_spec(guidance="embedded", adaptive_guidance_threshold=None).train()
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
class GuidanceDistillPass(Pass):
    name = "guidance_distill"
    description = "one evaluation reproduces classifier-free guidance at scale w (w embedded); halves NFE"
    Config = GuidanceDistillConfig

    def check(self, model: Any, target: Any, adapter: Any) -> None:
        _require_diffusion(model, self.name)

    def requires(self, model: Any, ctx: PassContext) -> None:
        _require_diffusion(model, self.name)
        if model.spec.guidance != "cfg" or model.guidance_embedded:
            raise PassError(f"{self.name}: the model must use classifier-free guidance (guidance: cfg)")
        if not getattr(model.conditioner, "accepts_guidance", True):
            raise PassError(
                f"{self.name}: a {type(model.unet).__name__} embeds its class inside every block, with no "
                "input to add a guidance-scale embedding to; progressive_distill and consistency_distill "
                "bake the CFG scale into the student instead"
            )

    def run(self, model: Any, ctx: PassContext) -> nn.Module:
        with ctx.progress_bar(self.name, self.config.train_steps) as bar:
            student, losses = guidance_distill(model, ctx.data, self.config, ctx.seed, bar)
        ctx.record("loss", _summary(losses))
        return student

    def ensures(self, model: Any, ctx: PassContext) -> None:
        if not (model.guidance_embedded and model.spec.guidance == "embedded"):
            raise PassError(f"{self.name}: the student does not embed the guidance scale")


@dataclass(frozen=True)
class ProgressiveDistillConfig(TrainOptions):
    final_steps: int = option(4, help="sampling steps of the final student", le=1000)
    start_steps: int | None = option(
        None, help="DDIM steps of the first teacher; null = the steps the model already samples with", le=1000
    )
    train_steps: int = option(200, help="optimizer steps per halving round")
    batch_size: int = option(64, help="real images per step", le=65_536)
    lr: float = option(2e-4, help="AdamW learning rate", gt=0.0, le=1.0)
    lora_rank: int = option(
        0,
        help="0 = fine-tune the whole denoiser; r > 0 = train rank-r LoRA adapters (peft), merged after",
        le=4096,
    )
    version: int = option(1, help="config schema version")

    def validate(self, path: str) -> None:
        self._check_train(path)
        if self.final_steps < 1:
            raise RecipeError(f"{path}.final_steps: must be at least 1, got {self.final_steps}")
        if self.start_steps is not None:
            _check_halvings(self.start_steps, self.final_steps, f"{path}.start_steps")


def _check_halvings(start: int, final: int, what: str) -> int:
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
class ProgressiveDistillPass(Pass):
    name = "progressive_distill"
    description = "rounds of teacher-to-student distillation, each halving the DDIM step count"
    Config = ProgressiveDistillConfig

    def check(self, model: Any, target: Any, adapter: Any) -> None:
        _require_diffusion(model, self.name)

    def requires(self, model: Any, ctx: PassContext) -> None:
        _require_diffusion(model, self.name)
        start = self.config.start_steps or model.spec.steps
        try:
            _check_halvings(start, self.config.final_steps, f"{self.name}: start steps")
        except RecipeError as e:
            raise PassError(f"{e}; set start_steps") from None

    def run(self, model: Any, ctx: PassContext) -> nn.Module:
        steps = self.config.start_steps or model.spec.steps
        rounds = []
        while steps > self.config.final_steps:
            steps //= 2
            with ctx.progress_bar(f"{self.name} {2 * steps}->{steps} steps", self.config.train_steps) as bar:
                model, losses = progressive_round(model, ctx.data, steps, self.config, ctx.seed + steps, bar)
            rounds.append({"steps": steps, **_summary(losses)})
            log.info("progressive_distill: %d-step student, loss %s", steps, rounds[-1])
        ctx.record("rounds", rounds)
        return model

    def ensures(self, model: Any, ctx: PassContext) -> None:
        spec = model.spec
        if spec.steps != self.config.final_steps or spec.guidance == "cfg":
            raise PassError(
                f"{self.name}: the student samples {spec.steps} steps with {spec.guidance} guidance"
            )


@dataclass(frozen=True)
class ConsistencyDistillConfig(TrainOptions):
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
    train_steps: int = option(600, help="optimizer steps")
    batch_size: int = option(64, help="real images per step", le=65_536)
    lr: float = option(1e-4, help="AdamW learning rate", gt=0.0, le=1.0)
    lora_rank: int = option(
        0,
        help="0 = fine-tune the whole denoiser; r > 0 = train rank-r LoRA adapters (peft), merged after",
        le=4096,
    )
    version: int = option(1, help="config schema version")

    def validate(self, path: str) -> None:
        self._check_train(path)
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


def consistency_distill(
    model: DiffusionModel,
    data: DataSplits,
    cfg: ConsistencyDistillConfig,
    seed: int,
    bar: Progress | None = None,
) -> tuple[DiffusionModel, list[float]]:
    """LCM: || f_theta(x_{t}, t) - f_ema(DDIM_teacher(x_t, t -> t - k), t - k) ||, t on the skip grid."""
    teacher = model.eval()
    if cfg.segments == 1:
        student = make_student(
            model,
            sampler="lcm",
            steps=cfg.sampling_steps,
            original_inference_steps=cfg.original_inference_steps,
        )
    else:
        student = make_student(model, sampler="ddim", steps=cfg.segments)
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
class ConsistencyDistillPass(Pass):
    name = "consistency_distill"
    description = "latent-consistency distillation (skipping-step DDIM solver, EMA target); 1-4 step sampling"
    Config = ConsistencyDistillConfig

    def check(self, model: Any, target: Any, adapter: Any) -> None:
        _require_diffusion(model, self.name)
        n_train = model.num_train_timesteps
        if n_train % self.config.original_inference_steps:
            raise PlanError(
                f"{self.name}: original_inference_steps {self.config.original_inference_steps} must divide "
                f"the teacher's {n_train} training timesteps"
            )

    def requires(self, model: Any, ctx: PassContext) -> None:
        self.check(model, ctx.target, ctx.adapter)

    def run(self, model: Any, ctx: PassContext) -> nn.Module:
        with ctx.progress_bar(self.name, self.config.train_steps) as bar:
            student, losses = consistency_distill(model, ctx.data, self.config, ctx.seed, bar)
        ctx.record("loss", _summary(losses))
        return student

    def ensures(self, model: Any, ctx: PassContext) -> None:
        spec = model.spec
        want = self.config.sampling_steps
        if spec.steps != want or spec.guidance == "cfg":
            raise PassError(
                f"{self.name}: the student samples {spec.steps} steps ({spec.guidance}), expected {want}"
            )
