"""The diffusion model the pipeline carries: a diffusers denoiser plus its sampling recipe.

``DiffusionModel`` is an ``nn.Module`` holding the denoiser, the conditioner that turns
a condition (and, after guidance distillation, a guidance scale) into the denoiser's
conditioning inputs, the training noise schedule, and a ``SamplingSpec``: which
diffusers scheduler, how many steps, and how guidance is applied (classifier-free
guidance with two evaluations, an embedded guidance scale with one, or none).
Step-reduction passes return a *student* ``DiffusionModel``: a new denoiser and a spec
with N steps. Because the student is the model the pipeline carries, any later pass
(quantization, sparsity) that walks the module tree acts on the student's denoiser.

Covered denoisers:
- class-conditional ``UNet2DModel`` (the label embedding lifted into a ``ClassConditioner``);
- class-conditional ``DiTTransformer2DModel`` (labels passed as indices by a
  ``LabelConditioner``: DiT embeds them inside every block, so it takes no guidance
  embedding; step distillation bakes the CFG scale into its student instead);
- text-conditional ``UNet2DConditionModel`` (cross-attention on prompt token embeddings)
  and ``SD3Transformer2DModel`` (the MMDiT of Stable Diffusion 3: joint attention on prompt
  tokens plus a pooled prompt embedding), through a ``TextConditioner`` that holds a table
  of prompts encoded once by a real text encoder; conditions index that table.
Training objectives (``schedule``): epsilon prediction on DDPM schedules,
sampled by DDIM, DPM-Solver++, UniPC or LCM; flow matching (velocity prediction, static
shift), sampled by FlowMatchEuler, FlowMatchLCM, or the flow variants of DPM-Solver++ /
UniPC. All with classifier-free guidance. Not covered: v-prediction, dynamic shifting,
guidance distillation of a DiT, latent (VAE) pipelines: the digits are denoised in pixel
space.

Package layout: ``model`` (this: DiffusionModel, SamplingSpec, the traced graph),
``conditioners``, ``builders`` (from_class_unet / from_dit / from_text_denoiser),
``loading`` (folders -> DiffusionModel), ``step_reduced_pipeline`` (the serving pipeline),
``adapter`` (DiffusersAdapter) and ``schedule`` (noise schedules, diffusers schedulers).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compressor.adapters.diffusion.schedule import NoiseSchedule, make_scheduler, training_schedule
from compressor.adapters.digits import NULL_LABEL
from compressor.errors import PassError

Sampler = Literal["ddim", "dpmsolver++", "unipc", "lcm"]
Guidance = Literal["cfg", "embedded", "none"]


@dataclass(frozen=True)
class SamplingSpec:
    """How the model is sampled: scheduler, step count and guidance.

    ``ddim`` is the deterministic first-order sampler: DDIM for epsilon models, the Euler
    step (FlowMatchEulerDiscreteScheduler) for flow-matching models.
    """

    sampler: Sampler = "ddim"
    steps: int = 50
    guidance: Guidance = "cfg"
    guidance_scale: float = 2.0
    adaptive_guidance_threshold: float | None = None  # cosine(out_c, out_u) above which uncond is dropped
    adaptive_guidance_warmup: float = 0.3  # fraction of steps always guided (at pure noise eps_c ~ eps_u ~ x)
    original_inference_steps: int = 50  # the LCM skipping-step grid a consistency student was trained on


def spec_takes_generator(sched: Any) -> bool:
    import inspect

    return "generator" in inspect.signature(sched.step).parameters


DENOISERS = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "DiTTransformer2DModel")


def denoiser_component(denoiser: nn.Module) -> str:
    """The pipeline component name diffusers gives this denoiser: ``unet`` or ``transformer``."""
    return "transformer" if "Transformer" in type(denoiser).__name__ else "unet"


class DiffusionModel(nn.Module):
    """Denoiser + conditioner + noise schedule + sampling spec; ``sample`` counts NFE.

    ``unet`` holds the denoiser whatever its kind (UNet2DModel, UNet2DConditionModel,
    SD3Transformer2DModel or DiTTransformer2DModel; the attribute name keeps layer names
    such as ``unet.…`` stable across kinds). ``forward`` takes the timestep the denoiser is fed (what the scheduler
    yields); the passes map integer training timesteps to it with ``schedule.model_t``.
    """

    unet: Any
    conditioner: Any  # a ClassConditioner, LabelConditioner or TextConditioner
    schedule: NoiseSchedule
    spec: SamplingSpec
    train_config: dict[str, Any]

    def __init__(
        self, unet: nn.Module, conditioner: nn.Module, train_config: dict[str, Any], spec: SamplingSpec
    ):
        super().__init__()
        kind = type(unet).__name__
        if kind not in DENOISERS:
            raise PassError(f"the diffusers adapter supports denoisers {list(DENOISERS)}, not {kind}")
        self.unet = unet
        self.conditioner = conditioner
        self.train_config = training_schedule(train_config)
        self.spec = spec
        self.schedule = NoiseSchedule(self.train_config)
        self._x_arg = "hidden_states" if "Transformer" in kind else "sample"
        cfg: Any = unet.config
        # a learned-variance denoiser (DiT's out_channels = 2 x in) returns [output, variance]
        self._out_channels = int(cfg.in_channels) if cfg.out_channels == 2 * cfg.in_channels else None

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def guidance_embedded(self) -> bool:
        return getattr(self.conditioner, "guidance_mlp", None) is not None

    def with_spec(self, **changes: Any) -> DiffusionModel:
        """The same modules (shared, not copied) under a changed sampling spec."""
        out = copy.copy(self)
        out._modules = dict(self._modules)
        out._buffers = dict(self._buffers)
        out.spec = dataclasses.replace(self.spec, **changes)
        return out

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One network function evaluation on (B,C,H,W) x at denoiser timesteps t: the model's
        output (epsilon, or velocity for flow models). ``labels`` index the conditions (digit
        classes, or the prompts of a text conditioner); the last one is the null condition."""
        if self.guidance_embedded and w is None:
            w = torch.full((x.shape[0],), self.spec.guidance_scale, device=x.device)
        cond = self.conditioner(labels, w) if self.guidance_embedded else self.conditioner(labels)
        out = self.unet(**{self._x_arg: x}, timestep=t, **cond).sample
        return out if self._out_channels is None else out[:, : self._out_channels]

    def guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        active: torch.Tensor | None = None,
        may_drop: bool = True,
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """Guided output per the spec -> (output, evaluations spent per image, still-guided mask).

        ``active`` (B,) bool marks samples whose uncond branch is still evaluated under
        adaptive guidance (Castillo et al., "Adaptive Guidance", 2023): once cosine(out_c,
        out_u) passes the threshold for a sample, later steps use out_c alone for it. The
        combination is linear, so it is the same in epsilon and in velocity space.
        """
        b = x.shape[0]
        s = self.spec.guidance_scale
        if self.spec.guidance in ("embedded", "none") or s == 1.0 and self.spec.guidance == "cfg":
            w = torch.full((b,), s, device=x.device) if self.guidance_embedded else None
            return self(x, t, labels, w), 1.0, active
        if active is None:
            active = torch.ones(b, dtype=torch.bool, device=x.device)
        idx = active.nonzero().squeeze(1)
        null = torch.full((idx.numel(),), NULL_LABEL, dtype=labels.dtype, device=labels.device)
        both = self(
            torch.cat([x, x[idx]]), torch.cat([t, t[idx]]), torch.cat([labels, null])
        )  # (B + n_active, C, H, W)
        out_c, out_u_active = both[:b], both[b:]
        out = out_c.clone()
        out[idx] = out_u_active + s * (out_c[idx] - out_u_active)
        cost = 1.0 + idx.numel() / b
        if self.spec.adaptive_guidance_threshold is not None and idx.numel() and may_drop:
            cos = nn.functional.cosine_similarity(out_c[idx].flatten(1), out_u_active.flatten(1), dim=1)
            active = active.clone()
            active[idx[cos > self.spec.adaptive_guidance_threshold]] = False
        return out, cost, active

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, float]:
        """Images (B,C,H,W) in [-1, 1] for ``labels`` and the NFE spent per image."""
        sched = make_scheduler(self.train_config, self.spec)
        size = int(self.unet.config.sample_size)
        chans = int(self.unet.config.in_channels)
        sigma0 = float(getattr(sched, "init_noise_sigma", None) or 1.0)
        x = torch.randn((labels.shape[0], chans, size, size), generator=generator) * sigma0
        scale = getattr(sched, "scale_model_input", lambda x, t: x)
        nfe, active = 0.0, None
        warm = self.spec.adaptive_guidance_warmup * len(sched.timesteps)
        kwargs = {"generator": generator} if spec_takes_generator(sched) else {}
        for i, t in enumerate(sched.timesteps):
            tt = (
                t.expand(labels.shape[0]) if t.is_floating_point() else torch.full((labels.shape[0],), int(t))
            )
            out, cost, active = self.guided(scale(x, t), tt, labels, active, i + 1 >= warm)
            nfe += cost
            x = sched.step(out, t, x, **kwargs).prev_sample
        return x.clamp(-1, 1), nfe


class DenoiserGraph(nn.Module):
    """The traced ONNX graph: (x, t, labels[, w]) -> epsilon, one evaluation."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args)
