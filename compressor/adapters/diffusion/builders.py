"""Builders that put a diffusers denoiser under the conditioner it needs -> ``DiffusionModel``.

- ``from_class_unet``: a class-conditional ``UNet2DModel``; its label embedding is lifted
  into a ``ClassConditioner`` (so guidance distillation can add a guidance embedding);
- ``from_dit``: a class-conditional ``DiTTransformer2DModel`` under a ``LabelConditioner``;
- ``from_text_denoiser``: ``UNet2DConditionModel`` / ``SD3Transformer2DModel`` over a
  ``TextConditioner`` table of prompts encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compressor.adapters.diffusion.conditioners import ClassConditioner, LabelConditioner, TextConditioner
from compressor.adapters.diffusion.model import DiffusionModel, SamplingSpec
from compressor.adapters.digits import NUM_CLASSES
from compressor.errors import DataError, PassError


def from_class_unet(unet: nn.Module, train_config: dict[str, Any], spec: SamplingSpec) -> DiffusionModel:
    """Lift a class-conditional UNet2DModel's label embedding into a ClassConditioner."""
    emb = getattr(unet, "class_embedding", None)
    if type(unet).__name__ != "UNet2DModel" or not isinstance(emb, nn.Embedding):
        raise PassError(
            "a class-conditional denoiser must be a UNet2DModel with num_class_embeds set and "
            f"class_embed_type None; this {type(unet).__name__} has class_embedding {type(emb).__name__}"
        )
    cond = ClassConditioner(num_embeddings=emb.num_embeddings, embed_dim=emb.embedding_dim)
    cond.label_embedding.load_state_dict(emb.state_dict())
    unet.class_embedding = nn.Identity()
    unet.register_to_config(class_embed_type="identity", num_class_embeds=None)  # type: ignore[operator]
    return DiffusionModel(unet, cond, train_config, spec)


def from_dit(dit: Any, train_config: dict[str, Any], spec: SamplingSpec) -> DiffusionModel:
    """A class-conditional DiTTransformer2DModel (Peebles & Xie, 2023) under a LabelConditioner.

    DiT embeds the class inside every block's adaLN-Zero (its own label table per block,
    the null class at index ``num_embeds_ada_norm``), so the label goes in as an index; the
    tables' random label dropout (training mode only) is switched off, since the passes
    train students in training mode and choose the null label themselves.
    """
    cfg = dit.config
    if cfg.norm_type != "ada_norm_zero" or not cfg.num_embeds_ada_norm:
        raise PassError(
            "a DiTTransformer2DModel must be class-conditional (norm_type ada_norm_zero, num_embeds_ada_norm "
            f"set); this one has norm_type {cfg.norm_type!r}, num_embeds_ada_norm {cfg.num_embeds_ada_norm}"
        )
    if int(cfg.num_embeds_ada_norm) != NUM_CLASSES:
        raise DataError(
            f"the DiT has {cfg.num_embeds_ada_norm} classes; the digits conditions need {NUM_CLASSES} "
            f"(its null class, index {NUM_CLASSES}, is the null label)"
        )
    for m in dit.modules():
        if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):  # diffusers LabelEmbedding
            m.dropout_prob = 0.0
    return DiffusionModel(dit, LabelConditioner(num_classes=int(cfg.num_embeds_ada_norm)), train_config, spec)


def from_text_denoiser(
    denoiser: Any,
    train_config: dict[str, Any],
    spec: SamplingSpec,
    prompts: Sequence[str],
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor | None = None,
) -> DiffusionModel:
    """A text-conditional denoiser (UNet2DConditionModel or SD3Transformer2DModel) over a table
    of encoded prompts; ``labels`` index the table, the last prompt is the null prompt ""."""
    kind = type(denoiser).__name__
    cfg: Any = denoiser.config
    if kind == "UNet2DConditionModel":
        want, guidance_dim = int(cfg.cross_attention_dim), int(denoiser.time_embedding.linear_2.out_features)
        target = "class_labels"
    elif kind == "SD3Transformer2DModel":
        want, guidance_dim, target = (
            int(cfg.joint_attention_dim),
            int(cfg.pooled_projection_dim),
            "pooled_projections",
        )
        if pooled_embeds is None:
            raise DataError("an SD3 transformer needs pooled prompt embeddings (pooled_projections)")
        if pooled_embeds.shape[-1] != guidance_dim:
            raise DataError(f"pooled prompt embeddings are {pooled_embeds.shape[-1]} wide; the transformer's "
                            f"pooled_projection_dim is {guidance_dim}")  # fmt: skip
    else:
        raise PassError(
            f"a text-conditional denoiser must be a UNet2DConditionModel or SD3Transformer2DModel, not {kind}"
        )
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != len(prompts) or prompt_embeds.shape[-1] != want:
        raise DataError(
            f"prompt embeddings {tuple(prompt_embeds.shape)} do not fit: need ({len(prompts)} prompts, "
            f"tokens, {want}) for this {kind}"
        )
    if prompts[-1] != "":
        raise DataError('the last prompt of a text-conditional table must be the null prompt ""')
    cond = TextConditioner(
        prompts=list(prompts),
        max_length=int(prompt_embeds.shape[1]),
        text_dim=want,
        pooled_dim=0 if pooled_embeds is None else int(pooled_embeds.shape[-1]),
        guidance_target=target,
        guidance_embed_dim=guidance_dim,
    )
    cond.prompt_embeds.copy_(prompt_embeds)
    if pooled_embeds is not None:
        cond.pooled_embeds.copy_(pooled_embeds)
    return DiffusionModel(denoiser, cond, train_config, spec)
