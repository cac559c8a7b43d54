"""The conditioners that sit beside a diffusers denoiser.

A class-conditional ``UNet2DModel`` adds ``class_embedding(label)`` to its timestep
embedding. We lift that embedding out of the UNet (the UNet keeps
``class_embed_type="identity"`` and is handed the finished vector), so a student can
add more conditions to the same vector without changing the UNet's class: guidance
distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023)
feeds the guidance scale w as a Fourier-feature MLP embedding added here. The UNet
stays a plain diffusers model (``save_pretrained`` / ``from_pretrained`` round-trip),
and this conditioner is a diffusers ``ModelMixin`` so a pipeline folder can carry it.

A text-conditional denoiser (``UNet2DConditionModel``, ``SD3Transformer2DModel``) gets its
conditions from a ``TextConditioner``: prompt token (and pooled) embeddings from a real
text encoder, computed once for the prompts the model is trained and sampled with.

A conditioner's config also records the sampling recipe the student was compiled for
(sampler, steps, guidance mode and scale) and the teacher's training noise schedule, so
a reloaded pipeline samples the way the compiler measured it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("diffusion models need diffusers: pip install 'compressor[diffusion]'") from e


def fourier_features(w: torch.Tensor, dim: int, max_period: float = 100.0) -> torch.Tensor:
    """(B,) guidance scales -> (B, dim) sin/cos features (the timestep embedding recipe)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=w.device) / half)
    args = w.float()[:, None] * freqs[None, :] * 10.0  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def guidance_mlp(fourier_dim: int, out_dim: int) -> nn.Sequential:
    """Fourier features of w -> out_dim, last layer zero-initialised: a student with it starts
    as exactly the conditional teacher."""
    mlp = nn.Sequential(nn.Linear(fourier_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
    last = mlp[2]
    assert isinstance(last, nn.Linear)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return mlp


class ClassConditioner(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """label (and optionally w) -> ``{"class_labels": (B, embed_dim)}``, the vector a
    UNet2DModel adds to its time embedding."""

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
        noise_schedule: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.label_embedding = nn.Embedding(num_embeddings, embed_dim)
        self.guidance_mlp: nn.Sequential | None = None
        if guidance_embedding:
            self.guidance_mlp = guidance_mlp(guidance_fourier_dim, embed_dim)

    def forward(
        self, labels: torch.Tensor, guidance_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        emb = self.label_embedding(labels)  # (B, D)
        if self.guidance_mlp is not None:
            emb = emb + _guidance(self, guidance_scale, emb.dtype)
        return {"class_labels": emb}


class LabelConditioner(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """label -> ``{"class_labels": label}`` for denoisers that embed the class themselves
    (DiTTransformer2DModel: a label table inside every block's adaLN-Zero). Nothing to add a
    guidance embedding to, so ``accepts_guidance`` is false."""

    accepts_guidance = False
    guidance_mlp = None

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        guidance: str = "cfg",
        guidance_scale: float = 3.0,
        adaptive_guidance_threshold: float | None = None,
        original_inference_steps: int = 50,
        adaptive_guidance_warmup: float = 0.3,
        int8_layers: dict[str, str] | None = None,
        noise_schedule: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # condition index -> the denoiser's class index (the null condition, last, -> its null class);
        # the identity for the digits, kept as a buffer so the folder has weights to save and load
        self.register_buffer("label_map", torch.arange(num_classes + 1))

    def forward(
        self, labels: torch.Tensor, guidance_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return {"class_labels": self.label_map[labels]}


def _guidance(cond: Any, w: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if w is None:
        raise ValueError("this conditioner was guidance-distilled: pass guidance_scale (B,)")
    feats = fourier_features(w, int(cond.config["guidance_fourier_dim"]))
    return cond.guidance_mlp(feats.to(dtype))


class TextConditioner(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Condition index (and optionally w) -> a text-conditional denoiser's inputs.

    Holds a table of prompts (``config.prompts``, the last one the null prompt "") encoded
    once by a real text encoder: ``prompt_embeds`` (P, max_length, text_dim) go to the
    denoiser as ``encoder_hidden_states`` (cross / joint attention) and, for SD3
    transformers, ``pooled_embeds`` (P, pooled_dim) as ``pooled_projections``. A
    guidance-distilled conditioner adds the w embedding to ``guidance_target``: the pooled
    projection (SD3, like Flux's guidance embedding) or a UNet's class-embedding input.
    """

    @register_to_config
    def __init__(
        self,
        prompts: list[str] | None = None,
        max_length: int = 16,
        text_dim: int = 384,
        pooled_dim: int = 0,
        guidance_target: str = "class_labels",
        guidance_embed_dim: int = 256,
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
        noise_schedule: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        n = len(prompts or [])
        self.register_buffer("prompt_embeds", torch.zeros(n, max_length, text_dim))
        self.register_buffer("pooled_embeds", torch.zeros(n, pooled_dim))
        self.guidance_mlp: nn.Sequential | None = None
        if guidance_embedding:
            self.guidance_mlp = guidance_mlp(guidance_fourier_dim, guidance_embed_dim)

    def index(self, prompts: list[str]) -> torch.Tensor:
        """The condition indices of ``prompts``; a prompt outside the table is an error naming the table."""
        table = list(self.config["prompts"] or [])
        missing = [p for p in prompts if p not in table]
        if missing:
            raise ValueError(f"prompts {missing} are not in this student's prompt table {table}")
        return torch.tensor([table.index(p) for p in prompts])

    def forward(
        self, labels: torch.Tensor, guidance_scale: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = {"encoder_hidden_states": self.prompt_embeds[labels]}
        if self.config["pooled_dim"]:
            out["pooled_projections"] = self.pooled_embeds[labels]
        if self.guidance_mlp is not None:
            g = _guidance(self, guidance_scale, self.prompt_embeds.dtype)
            target = self.config["guidance_target"]
            out[target] = out[target] + g if target in out else g
        return out
