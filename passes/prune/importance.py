"""Importance scores for structured pruning: heads, FFN channels and whole layers.

Activation-based scores follow Minitron (Muralidharan et al., "Compact Language Models
via Pruning and Knowledge Distillation", 2024): a unit matters as much as the
activation it produces on calibration data. We aggregate each unit's activation as a
root-mean-square over all calibration tokens and multiply by the norm of the output
projection that carries it into the residual stream, so the score measures how much
removing the unit removes from the layer output:

- head h:     sqrt(mean_t ||a_h(t) W_o[:, h]ᵀ||²)   (a_h: the head's attention output)
- channel j:  sqrt(mean_t a_j(t)²) · ||W_down[:, j]||
- layer l:    block importance (Men et al., "ShortGPT", 2024), 1 - mean_t cos(x_l, y_l),
              or the relative change ||y_l - x_l|| / ||x_l||; a layer that barely
              changes its input is the cheapest to drop.

``magnitude`` (data-free weight norms) and ``random`` scores are baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compressor.passes.prune.structure import Anatomy

UnitMethod = Literal["activation", "magnitude", "random"]
LayerMethod = Literal["cosine", "relative_change", "random"]


@dataclass
class ImportanceScores:
    heads: torch.Tensor  # (L, H): higher = more important
    ffn: torch.Tensor  # (L, I)
    layers: torch.Tensor  # (L,)


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def activation_importance(
    model: nn.Module,
    anatomy: Anatomy,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    layer_method: LayerMethod = "cosine",
) -> ImportanceScores:
    """Run ``forward(model, batch)`` over ``batches`` and score heads, channels and layers."""
    num_l, heads, hd = anatomy.num_layers, anatomy.num_heads, anatomy.head_dim
    head_sq = torch.zeros(num_l, heads, dtype=torch.float64)
    ffn_sq = torch.zeros(num_l, anatomy.intermediate_size, dtype=torch.float64)
    layer_sum = torch.zeros(num_l, dtype=torch.float64)
    tokens = torch.zeros(num_l, dtype=torch.float64)
    layer_tokens = torch.zeros(num_l, dtype=torch.float64)
    parts = anatomy.parts
    handles = []

    def head_hook(i: int, o_proj: nn.Linear) -> Callable[..., None]:
        w = o_proj.weight.detach().float().reshape(o_proj.out_features, heads, hd)  # (out, H, d)
        gram = torch.einsum("ohd,ohe->hde", w, w)  # (H, d, d): W_o,hᵀ W_o,h

        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().float().reshape(-1, heads, hd)  # (tokens, H, d)
            # ||a_h W_o,hᵀ||² = a_h G_h a_hᵀ, summed over tokens
            head_sq[i] += torch.einsum("thd,hde,the->h", a, gram, a).double()
            tokens[i] += a.shape[0]

        return hook

    def ffn_hook(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, I)
            ffn_sq[i] += a.pow(2).sum(dim=0).double()

        return hook

    def layer_hook(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = _hidden_in(args, kwargs).detach().float().reshape(-1, anatomy.config.hidden_size)
            y = _hidden_out(output).detach().float().reshape(-1, anatomy.config.hidden_size)
            if layer_method == "relative_change":
                per_token = (y - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-12)
            else:
                per_token = 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=1)
            layer_sum[i] += per_token.sum().double()
            layer_tokens[i] += per_token.numel()

        return hook

    for i, layer in enumerate(anatomy.layers):
        handles.append(
            layer.get_submodule(parts.o).register_forward_pre_hook(head_hook(i, anatomy.linear(i, parts.o)))
        )
        handles.append(layer.get_submodule(parts.ffn_out).register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    if tokens.min() == 0:
        raise ValueError("no calibration tokens reached the layers; is the batch list empty?")
    down_norm = torch.stack(
        [anatomy.linear(i, parts.ffn_out).weight.detach().float().norm(dim=0) for i in range(num_l)]
    )  # (L, I)
    head = (head_sq / tokens[:, None]).sqrt().float()
    ffn = (ffn_sq / tokens[:, None]).sqrt().float() * down_norm
    layer = (layer_sum / layer_tokens).float()
    if layer_method == "random":
        layer = torch.rand(num_l)
    return ImportanceScores(head, ffn, layer)


@torch.no_grad()
def magnitude_importance(anatomy: Anatomy) -> ImportanceScores:
    """Data-free scores: head = ||W_o[:, h]||_F, channel = Π||W_in[j]|| · ||W_down[:, j]||.

    Layers get a flat score (magnitude says nothing about a whole layer)."""
    parts, heads, hd = anatomy.parts, anatomy.num_heads, anatomy.head_dim
    head_scores, ffn_scores = [], []
    for i in range(anatomy.num_layers):
        wo = anatomy.linear(i, parts.o).weight.float().reshape(-1, heads, hd)
        head_scores.append(wo.pow(2).sum(dim=(0, 2)).sqrt())
        w_in = torch.stack([anatomy.linear(i, n).weight.float().norm(dim=1) for n in parts.ffn_in]).prod(
            dim=0
        )
        ffn_scores.append(w_in * anatomy.linear(i, parts.ffn_out).weight.float().norm(dim=0))
    return ImportanceScores(torch.stack(head_scores), torch.stack(ffn_scores), torch.ones(anatomy.num_layers))


def random_importance(anatomy: Anatomy, seed: int = 0) -> ImportanceScores:
    g = torch.Generator().manual_seed(seed)
    num_l = anatomy.num_layers
    return ImportanceScores(
        torch.rand(num_l, anatomy.num_heads, generator=g),
        torch.rand(num_l, anatomy.intermediate_size, generator=g),
        torch.rand(num_l, generator=g),
    )
