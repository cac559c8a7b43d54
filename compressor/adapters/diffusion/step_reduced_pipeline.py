"""``StepReducedPipeline``: the diffusers pipeline a compiled (step-reduced) student is
served as, loadable with ``StepReducedPipeline.from_pretrained`` or, from the folder alone,
with ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)``.

Its conditioner's config records the compiled sampling recipe and the teacher's training
noise schedule, and which Linear layers were int8 (re-wrapped on load).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.adapters.diffusion.conditioners import TextConditioner
from compressor.adapters.diffusion.model import DiffusionModel, SamplingSpec
from compressor.adapters.diffusion.schedule import SCHEDULE_KEYS

try:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("diffusion models need diffusers: pip install 'compressor[diffusion]'") from e


class StepReducedPipeline(DiffusionPipeline):
    """A conditional sampling pipeline for a (step-reduced) diffusers denoiser.

    Components: the denoiser as ``unet`` (UNet2DModel, class_embed_type "identity";
    UNet2DConditionModel) or ``transformer`` (SD3Transformer2DModel), ``conditioner``
    (ClassConditioner or TextConditioner, which also records the compiled sampling recipe
    and the training noise schedule) and ``scheduler`` (the diffusers scheduler set up for
    the student's step count). Load with ``StepReducedPipeline.from_pretrained(folder)``
    or, from the folder alone, ``DiffusionPipeline.from_pretrained(folder,
    custom_pipeline=folder, trust_remote_code=True)`` (the folder carries a
    ``pipeline.py`` that imports this class).
    """

    _optional_components = ["unet", "transformer"]

    def __init__(
        self,
        conditioner: ModelMixin,
        scheduler: SchedulerMixin,
        unet: nn.Module | None = None,
        transformer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("a StepReducedPipeline has exactly one denoiser: unet or transformer")
        restore_int8_layers_(unet if unet is not None else transformer, conditioner)  # type: ignore[arg-type]
        self.register_modules(
            unet=unet, transformer=transformer, conditioner=conditioner, scheduler=scheduler
        )

    @property
    def denoiser(self) -> nn.Module:
        return self.unet if self.unet is not None else self.transformer

    def to_diffusion_model(self) -> DiffusionModel:
        """The compiler's DiffusionModel over these components (shared, not copied)."""
        c: Any = self.conditioner.config
        spec = SamplingSpec(
            sampler=c.sampler, steps=c.num_inference_steps, guidance=c.guidance, guidance_scale=c.guidance_scale,
            adaptive_guidance_threshold=c.adaptive_guidance_threshold,
            adaptive_guidance_warmup=c.adaptive_guidance_warmup,
            original_inference_steps=c.original_inference_steps,
        )  # fmt: skip
        train = c.noise_schedule or {
            k: v for k, v in dict(self.scheduler.config).items() if k in SCHEDULE_KEYS
        }
        return DiffusionModel(self.denoiser, self.conditioner, train, spec)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> ImagePipelineOutput:
        """Samples in [0, 1] as numpy (B, H, W, C), with the compiled steps and guidance.

        Conditions are ``class_labels`` (class indices, or prompt-table indices of a text
        conditioner) or, for a text conditioner, ``prompt`` (prompts from its table).
        """
        if (class_labels is None) == (prompt is None):
            raise ValueError("pass exactly one of class_labels or prompt")
        if prompt is not None:
            if not isinstance(self.conditioner, TextConditioner):
                raise ValueError("this pipeline is class-conditional: pass class_labels, not prompt")
            labels = self.conditioner.index([prompt] if isinstance(prompt, str) else list(prompt))
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long)
        images, _ = self.to_diffusion_model().sample(labels, generator)
        return ImagePipelineOutput(images=((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())


def restore_int8_layers_(unet: nn.Module, conditioner: ModelMixin) -> None:
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
