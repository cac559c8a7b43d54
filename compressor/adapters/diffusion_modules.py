"""The class (and guidance-scale) conditioner that sits beside a diffusers UNet2DModel.

A class-conditional ``UNet2DModel`` adds ``class_embedding(label)`` to its timestep
embedding. We lift that embedding out of the UNet (the UNet keeps
``class_embed_type="identity"`` and is handed the finished vector), so a student can
add more conditions to the same vector without changing the UNet's class: guidance
distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023)
feeds the guidance scale w as a Fourier-feature MLP embedding added here. The UNet
stays a plain diffusers model (``save_pretrained`` / ``from_pretrained`` round-trip),
and this conditioner is a diffusers ``ModelMixin`` so a pipeline folder can carry it.

The conditioner's config also records the sampling recipe the student was compiled
for (sampler, steps, guidance mode and scale), so a reloaded pipeline samples the way
the compiler measured it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("diffusion models need diffusers: pip install 'compressor[diffusion]'") from e


def fourier_features(w: torch.Tensor, dim: int, max_period: float = 100.0) -> torch.Tensor:
    """(B,) guidance scales -> (B, dim) sin/cos features (the timestep embedding recipe)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=w.device) / half)
    args = w.float()[:, None] * freqs[None, :] * 10.0  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class ClassConditioner(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """label (and optionally w) -> the (B, embed_dim) vector the UNet adds to its time embedding."""

    @register_to_config
    def __init__(
        self,
        num_embeddings: int = 11,
        embed_dim: int = 256,
        guidance_embedding: bool = False,
        guidance_fourier_dim: int = 64,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        guidance: str = "cfg",
        guidance_scale: float = 3.0,
        adaptive_guidance_threshold: float | None = None,
        original_inference_steps: int = 50,
        adaptive_guidance_warmup: float = 0.3,
        int8_layers: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.label_embedding = nn.Embedding(num_embeddings, embed_dim)
        self.guidance_mlp: nn.Sequential | None = None
        if guidance_embedding:
            self.guidance_mlp = nn.Sequential(
                nn.Linear(guidance_fourier_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
            )
            # zero-init the last layer: the student starts as exactly the conditional teacher
            last = self.guidance_mlp[2]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, labels: torch.Tensor, guidance_scale: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.label_embedding(labels)  # (B, D)
        if self.guidance_mlp is not None:
            if guidance_scale is None:
                raise ValueError("this conditioner was guidance-distilled: pass guidance_scale (B,)")
            feats = fourier_features(guidance_scale, int(self.config["guidance_fourier_dim"]))
            emb = emb + self.guidance_mlp(feats.to(emb.dtype))
        return emb


class StepReducedPipeline(DiffusionPipeline):
    """A class-conditional sampling pipeline for a (step-reduced) UNet2DModel student.

    Components: ``unet`` (UNet2DModel, class_embed_type "identity"), ``conditioner``
    (ClassConditioner, which also records the compiled sampling recipe) and ``scheduler``
    (the diffusers scheduler set up for the student's step count). Load with
    ``StepReducedPipeline.from_pretrained(folder)`` or, from the folder alone,
    ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`` (the folder
    carries a ``pipeline.py`` that imports this class).
    """

    def __init__(self, unet: nn.Module, conditioner: ClassConditioner, scheduler: SchedulerMixin) -> None:
        super().__init__()
        restore_int8_layers_(unet, conditioner)
        self.register_modules(unet=unet, conditioner=conditioner, scheduler=scheduler)

    def to_diffusion_model(self) -> nn.Module:
        """The compiler's DiffusionModel over these components (shared, not copied)."""
        from compressor.adapters.diffusion import DiffusionModel, SamplingSpec

        c: Any = self.conditioner.config
        spec = SamplingSpec(
            sampler=c.sampler, steps=c.num_inference_steps, guidance=c.guidance, guidance_scale=c.guidance_scale,
            adaptive_guidance_threshold=c.adaptive_guidance_threshold,
            adaptive_guidance_warmup=c.adaptive_guidance_warmup,
            original_inference_steps=c.original_inference_steps,
        )  # fmt: skip
        from compressor.adapters.diffusion import SCHEDULE_KEYS

        train = {k: v for k, v in dict(self.scheduler.config).items() if k in SCHEDULE_KEYS}
        return DiffusionModel(self.unet, self.conditioner, train, spec)

    @torch.no_grad()
    def __call__(
        self, class_labels: list[int] | torch.Tensor, generator: torch.Generator | None = None
    ) -> ImagePipelineOutput:
        """Samples in [0, 1] as numpy (B, H, W, C), with the compiled steps and guidance."""
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        images, _ = self.to_diffusion_model().sample(labels, generator)  # type: ignore[operator]
        return ImagePipelineOutput(images=((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())


_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def restore_int8_layers_(unet: nn.Module, conditioner: ClassConditioner) -> None:
    """Re-wrap the Linear layers the compiler quantized (recorded in the conditioner's
    ``int8_layers``: name -> activation scheme) as ``Int8Linear``.

    The folder stores an int8 layer's float weight (what ``Int8Linear`` keeps; its
    per-channel scales are a pure function of it), so ``Int8Linear.from_linear`` on the
    reloaded Linear rebuilds the same layer. Layers with a SmoothQuant divisor are
    refused at export, since the divisor would be lost.
    """
    layers: dict[str, str] = getattr(conditioner.config, "int8_layers", None) or {}
    if not layers:
        return
    from compressor.kernels.int8_linear import Int8Linear
    from compressor.modules import set_module

    roots = {"unet": unet, "conditioner": conditioner}
    for name, scheme in layers.items():
        root_name, _, sub = name.partition(".")
        root = roots[root_name]
        linear = root.get_submodule(sub)
        if isinstance(linear, Int8Linear):
            continue
        set_module(root, sub, Int8Linear.from_linear(linear, act_scheme=scheme).eval())
