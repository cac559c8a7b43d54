"""An FP8 (E4M3) key/value cache for decoder LMs, emulated by a hook on each attention module.

vLLM (``kv_cache_dtype: fp8``) stores a decoder's keys and values in E4M3, each attention layer
with one float32 scale for K and one for V: ``k ≈ fp8(k / k_scale) · k_scale``. A
compressed-tensors checkpoint carries them as ``<attention>.k_scale`` / ``<attention>.v_scale``
(shape [1]) under ``kv_cache_scheme``, which is how llm-compressor writes them and vLLM reads
them. The scales are calibrated by the quantize pass (``compressor.passes.quantize.kv_cache``).

Emulation (``attach_kv_fp8_``): a forward pre-hook on each attention module hands it, in place of
its cache argument, a ``_KVView`` whose ``update(key, value, ...)`` rounds both through E4M3 with
the layer's scales (straight-through gradient) and passes them on to the real cache when there
is one. So every use of the model, with a cache or without, attends to the keys and values an
FP8 cache would hold. This covers transformers attention modules that hand their keys (after
RoPE) to ``cache.update`` (Llama, Mistral, Qwen2, ...); ``attention_modules`` finds them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compressor.kernels.fp8_linear import fake_quant_fp8

CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""What transformers' attention modules call their cache argument (``cache`` from 5.24 on)."""


def _cache_argument(module: nn.Module) -> tuple[str, int] | None:
    """The name and position of ``module.forward``'s cache argument (None: it has none)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name, params.index(name)
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules whose keys and values an FP8 cache would hold, by name."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "k_proj") and hasattr(m, "v_proj") and _cache_argument(m) is not None
    ]


class _KVView:
    """Stands in for an attention layer's cache argument: ``update`` sees every key and value."""

    def __init__(self, see: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 cache: Any) -> None:  # fmt: skip
        self.see, self.cache = see, cache

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        key, value = self.see(key, value)
        if self.cache is None:
            return key, value
        return self.cache.update(key, value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # what the real cache has besides update()
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def wrap_cache(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], see: Any) -> Any:
    """``(args, kwargs)`` with the cache argument, given by name or position, replaced by a view."""
    present = next((k for k in CACHE_ARGUMENTS if k in kwargs), None)
    if present is not None:
        kwargs[present] = _KVView(see, kwargs[present])
        return args, kwargs
    found = _cache_argument(module)
    if found is None:
        raise ValueError(
            f"{type(module).__name__} has no cache argument; an FP8 KV cache cannot see its keys"
        )
    name, pos = found
    if pos < len(args):
        args = (*args[:pos], _KVView(see, args[pos]), *args[pos + 1 :])
    else:
        kwargs[name] = _KVView(see, None)
    return args, kwargs


def _fp8_kv_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The permanent pre-hook: keys and values through E4M3 with the module's ``k_scale`` / ``v_scale``."""

    def see(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_scale, v_scale = module.k_scale, module.v_scale  # [1] float32 buffers
        return fake_quant_fp8(key, k_scale.to(key.dtype)), fake_quant_fp8(value, v_scale.to(value.dtype))

    return wrap_cache(module, args, kwargs, see)


def has_fp8_kv_cache(model: nn.Module) -> bool:
    return any(getattr(m, "fp8_kv_cache", False) for m in model.modules())


def attach_kv_fp8_(model: nn.Module, scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each named attention module its ``k_scale`` / ``v_scale`` buffers and the E4M3 hook."""
    for name, (k_scale, v_scale) in scales.items():
        m = model.get_submodule(name)
        for what, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            s = s.detach().float().reshape(1)
            if not bool(torch.isfinite(s).all()) or float(s) <= 0:
                raise ValueError(f"{name}.{what}: {float(s)} is not a positive finite FP8 scale")
            m.register_buffer(what, s.clone())
        if not getattr(m, "fp8_kv_cache", False):
            m.register_forward_pre_hook(_fp8_kv_hook, with_kwargs=True)
            m.__dict__["fp8_kv_cache"] = True  # a plain attribute: deep copies and pickles keep it
