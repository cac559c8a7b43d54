"""The anatomy of transformer models that structured pruning shrinks, and the surgery.

Two families are understood, found by their module structure rather than class names:

- BERT-style encoders (BERT, RoBERTa, MiniLM): ``encoder.layer[i]`` with
  ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense`` and ``output.dense``.
- Llama-style decoders (Llama, Qwen2, Mistral): ``layers[i]`` with
  ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``.

Widths stay uniform across layers (one ``num_attention_heads`` and one
``intermediate_size`` per model), so the pruned model's config is an ordinary Hugging
Face config and ``save_pretrained`` → ``from_pretrained`` rebuilds it exactly.
Head pruning needs a config that carries ``head_dim`` apart from ``hidden_size``:
Llama-style configs do; Transformers' BERT derives the head size as
``hidden_size / num_attention_heads``, so a head-pruned BERT could not be reloaded
and is refused.

The functions here are plain tensor surgery (they never score anything): the caller
says which units each layer keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Family = Literal["bert", "llama"]


@dataclass(frozen=True)
class LayerParts:
    """Names, relative to one layer, of the modules that pruning touches."""

    q: str
    k: str
    v: str
    o: str
    ffn_in: tuple[str, ...]  # linears whose output rows are FFN channels
    ffn_out: str  # the linear whose input columns are FFN channels
    attention: str  # the module holding per-layer head bookkeeping


BERT_PARTS = LayerParts(
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    attention="attention.self",
)
LLAMA_PARTS = LayerParts(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    attention="self_attn",
)


@dataclass
class Anatomy:
    """Where a model's layers are and what its widths are."""

    family: Family
    config: Any  # the Hugging Face PretrainedConfig the widths are written to
    layers_name: str  # dotted name of the ModuleList of layers
    layers: nn.ModuleList
    parts: LayerParts

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.config.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def can_prune_heads(self) -> bool:
        return self.family == "llama"

    def linear(self, layer: int, part: str) -> nn.Linear:
        module = self.layers[layer].get_submodule(part)
        assert isinstance(module, nn.Linear), f"{part} is not a Linear"
        return module


def _has(module: nn.Module, names: Sequence[str]) -> bool:
    for name in names:
        try:
            module.get_submodule(name)
        except AttributeError:
            return False
    return True


def find_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_attention_heads"):
        return config
    for _, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            return config
    raise ValueError(f"{type(model).__name__} has no Hugging Face config with the layer widths")


def describe_model(model: nn.Module) -> Anatomy:
    """Find the layer list and family of ``model``; ValueError if the structure is unknown."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for family, parts in (("bert", BERT_PARTS), ("llama", LLAMA_PARTS)):
            names = (parts.q, parts.k, parts.v, parts.o, *parts.ffn_in, parts.ffn_out)
            if all(_has(layer, names) for layer in module):
                return Anatomy(family, find_config(model), name, module, parts)  # type: ignore[arg-type]
    raise ValueError(
        f"{type(model).__name__}: no BERT-style (encoder.layer[i].attention.self.query ...) or "
        "Llama-style (layers[i].self_attn.q_proj ...) layer list found; structured pruning "
        "supports those two families"
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: Literal[0, 1]) -> nn.Linear:
    """A new Linear keeping output rows (dim 0) or input columns (dim 1) ``index``."""
    weight = linear.weight.index_select(dim, index.to(linear.weight.device)).clone()
    bias = None
    if linear.bias is not None:
        bias = linear.bias.index_select(0, index.to(linear.bias.device)).clone() if dim == 0 else linear.bias
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.train(linear.training)
    return new


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    setattr(parent, child, module)


def _head_index(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the kept heads: (H_keep,) -> (H_keep * head_dim,)."""
    heads = torch.sort(heads).values
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


@torch.no_grad()
def prune_ffn_(anatomy: Anatomy, keep: Sequence[torch.Tensor]) -> None:
    """Keep FFN channels ``keep[l]`` (same count in every layer) of each layer."""
    sizes = {int(k.numel()) for k in keep}
    if len(keep) != anatomy.num_layers or len(sizes) != 1:
        raise ValueError("prune_ffn_ needs one index set per layer, all of the same size")
    parts = anatomy.parts
    for i, idx in enumerate(keep):
        idx = torch.sort(idx.long()).values
        layer = anatomy.layers[i]
        for name in parts.ffn_in:
            _replace(layer, name, _slice_linear(anatomy.linear(i, name), idx, 0))
        _replace(layer, parts.ffn_out, _slice_linear(anatomy.linear(i, parts.ffn_out), idx, 1))
    anatomy.config.intermediate_size = sizes.pop()


@torch.no_grad()
def prune_heads_(anatomy: Anatomy, keep: Sequence[torch.Tensor]) -> None:
    """Keep query heads ``keep[l]`` (same count in every layer) of each layer.

    Multi-head attention drops the matching key/value heads too. Grouped-query
    attention keeps every key/value head, so each group must keep the same number of
    query heads (``keep[l]`` must hold ``n`` heads of each of the ``num_kv_heads``
    groups); ``select_heads_per_group`` makes such sets.
    """
    if not anatomy.can_prune_heads:
        raise ValueError(
            f"{anatomy.family}: Transformers derives this family's head size from hidden_size / "
            "num_attention_heads, so a head-pruned model could not be reloaded; prune ffn or layers"
        )
    sizes = {int(k.numel()) for k in keep}
    if len(keep) != anatomy.num_layers or len(sizes) != 1:
        raise ValueError("prune_heads_ needs one head set per layer, all of the same size")
    n_keep = sizes.pop()
    heads, kv, hd, parts = anatomy.num_heads, anatomy.num_kv_heads, anatomy.head_dim, anatomy.parts
    group = heads // kv
    mha = kv == heads
    if not mha and n_keep % kv:
        raise ValueError(f"grouped-query attention with {kv} key/value heads: keep a multiple of {kv} heads")
    for i, idx in enumerate(keep):
        idx = torch.sort(idx.long()).values
        if not mha:
            per_group = torch.bincount(idx // group, minlength=kv)
            if not bool((per_group == n_keep // kv).all()):
                raise ValueError(f"layer {i}: every key/value group must keep {n_keep // kv} query heads")
        rows = _head_index(idx, hd)
        layer = anatomy.layers[i]
        _replace(layer, parts.q, _slice_linear(anatomy.linear(i, parts.q), rows, 0))
        _replace(layer, parts.o, _slice_linear(anatomy.linear(i, parts.o), rows, 1))
        if mha:
            _replace(layer, parts.k, _slice_linear(anatomy.linear(i, parts.k), rows, 0))
            _replace(layer, parts.v, _slice_linear(anatomy.linear(i, parts.v), rows, 0))
        attn = layer.get_submodule(parts.attention)
        if hasattr(attn, "num_key_value_groups"):
            setattr(attn, "num_key_value_groups", 1 if mha else n_keep // kv)  # noqa: B010
        setattr(attn, "head_dim", hd)  # noqa: B010
    anatomy.config.head_dim = hd  # keep the head size when num_attention_heads changes
    anatomy.config.num_attention_heads = n_keep
    if mha and hasattr(anatomy.config, "num_key_value_heads"):
        anatomy.config.num_key_value_heads = n_keep


def select_heads_per_group(scores: torch.Tensor, n_keep: int, num_kv_heads: int) -> torch.Tensor:
    """The ``n_keep`` best heads of one layer (scores (H,)), equally many per kv group."""
    heads = scores.numel()
    if num_kv_heads == heads:
        return torch.topk(scores, n_keep).indices
    group = heads // num_kv_heads
    per = n_keep // num_kv_heads
    grouped = scores.reshape(num_kv_heads, group)  # (kv, group)
    top = torch.topk(grouped, per, dim=1).indices + torch.arange(num_kv_heads)[:, None] * group
    return top.reshape(-1)


@torch.no_grad()
def drop_layers_(anatomy: Anatomy, keep: Sequence[int]) -> None:
    """Keep only layers ``keep`` (in their original order); re-index cache slots."""
    keep = sorted(int(k) for k in keep)
    if not keep or len(set(keep)) != len(keep) or keep[-1] >= anatomy.num_layers or keep[0] < 0:
        raise ValueError(f"layers to keep {keep} are not distinct indices below {anatomy.num_layers}")
    kept = [anatomy.layers[k] for k in keep]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", new_idx)  # noqa: B010
    # empty the same ModuleList object and refill it, so every reference to it stays valid
    for idx in range(len(anatomy.layers) - 1, -1, -1):
        del anatomy.layers[idx]
    anatomy.layers.extend(kept)
    config = anatomy.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) >= max(keep) + 1:
        config.layer_types = [layer_types[k] for k in keep]
    config.num_hidden_layers = len(keep)
