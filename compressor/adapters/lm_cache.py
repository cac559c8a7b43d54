"""A decoder LM traced with its KV cache: the graph ONNX Runtime GenAI runs.

``CausalLMWithCache`` takes ``input_ids`` [B, S], ``attention_mask`` [B, P + S] (every
position so far), ``position_ids`` [B, S] and, per layer, ``past_key_values.{i}.key`` /
``.value`` [B, kv_heads, P, head_dim]; it returns ``logits`` [B, S, V] and
``present.{i}.key`` / ``.value`` [B, kv_heads, P + S, head_dim]. One graph serves prefill
(P = 0: empty past tensors) and decode (S = 1): the names and layout are the ones
``onnxruntime-genai``'s default decoder feeds (``genai_config.json``'s ``past_key_names``
``past_key_values.%d.key`` and so on). Inside, the past tensors become a transformers
``DynamicCache`` and the model runs its own cached forward, so whatever the model does with
its cache (RoPE at the right positions, grouped-query heads, our quantized layers) is what
is traced.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.adapters.base import ExportSpec


@dataclass(frozen=True)
class CacheGeometry:
    """The KV cache's shape: ``layers`` x (key, value) of [B, ``kv_heads``, T, ``head_dim``]."""

    layers: int
    kv_heads: int
    head_dim: int
    attention_heads: int
    hidden_size: int

    @classmethod
    def of(cls, config: Any) -> CacheGeometry:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(
            layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            attention_heads=heads,
            hidden_size=int(config.hidden_size),
        )

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def empty_past(self, batch: int, length: int = 0) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.kv_heads, length, self.head_dim) for _ in range(2 * self.layers)]


def cache_argument(model: nn.Module) -> str:
    """What ``model.forward`` calls its cache: ``cache`` (transformers 5.24 on) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class CausalLMWithCache(nn.Module):
    """The traced wrapper: ids, full mask, positions and the past in; logits and the present out."""

    def __init__(self, model: nn.Module, geometry: CacheGeometry) -> None:
        super().__init__()
        self.model, self.geometry = model, geometry

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=getattr(self.model, "config", None))
        for i in range(self.geometry.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument(self.model): cache},
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_export_spec(model: nn.Module, geometry: CacheGeometry, vocab: int) -> ExportSpec:
    """What to trace: a 2 x 5 step after 3 past positions (every axis that varies is dynamic, so
    prefill with an empty past runs the same graph)."""
    b, s, p = 2, 5, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    positions = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [
        torch.randn(b, geometry.kv_heads, p, geometry.head_dim, generator=g)
        for _ in range(2 * geometry.layers)
    ]
    inputs = ("input_ids", "attention_mask", "position_ids", *geometry.past_names())
    outputs = ("logits", *geometry.present_names())
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    dyn.update({n: {0: "batch", 2: "past_sequence"} for n in geometry.past_names()})
    dyn.update({n: {0: "batch", 2: "total_sequence"} for n in geometry.present_names()})
    return ExportSpec(
        module=CausalLMWithCache(model, geometry).eval(),
        example_inputs=(ids, mask, positions, *past),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes=dyn,
    )
