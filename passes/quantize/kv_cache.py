"""``kv_cache: fp8`` of `quantize`: calibrate each attention layer's K and V scales for an E4M3 cache.

The keys after RoPE and the values, as each attention layer hands them to its cache
(``compressor.kernels.fp8_kv_cache``), over the calibration batches and on the model as the pass
leaves it (its quantized ``k_proj`` / ``v_proj``): ``scale = max|k| / 448``. Padded positions are
included (their keys are computed like any other), so a scale is never below what the unpadded
data needs: nothing clips. The model then carries the scales and the E4M3 emulation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compressor.errors import DataError, PassError
from compressor.kernels.fp8_format import FP8_E4M3_MAX
from compressor.kernels.fp8_kv_cache import attach_kv_fp8_, attention_modules, has_fp8_kv_cache, wrap_cache


@torch.no_grad()
def calibrate_kv_fp8_(
    model: nn.Module, forward: Callable[[nn.Module, Any], torch.Tensor], batches: Iterable[Any]
) -> dict[str, Any]:
    """Calibrate every attention layer's K and V scales on ``batches`` and attach the FP8 cache."""
    layers = attention_modules(model)
    if not layers:
        raise PassError(
            "quantize.kv_cache: fp8 found no attention module with k_proj, v_proj and a cache argument; "
            "the model's attention is not one the FP8 KV cache covers: set kv_cache: none"
        )
    if has_fp8_kv_cache(model):
        raise PassError(
            "quantize.kv_cache: fp8: the model's KV cache is already FP8 (an earlier quantize pass)"
        )
    amax: dict[str, list[float]] = {n: [0.0, 0.0] for n, _ in layers}

    def recorder(name: str) -> Callable[..., Any]:
        def see(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if not (torch.isfinite(key).all() and torch.isfinite(value).all()):
                raise DataError(f"calibration keys or values of {name} contain NaN or inf")
            seen = amax[name]
            seen[0] = max(seen[0], float(key.abs().amax()))
            seen[1] = max(seen[1], float(value.abs().amax()))
            return key, value

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return wrap_cache(module, args, kwargs, see)

        return hook

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in layers]
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n, (k, v) in amax.items() if k == 0.0 and v == 0.0]
    if unseen:
        raise PassError(f"quantize.kv_cache: fp8: the calibration forward never reached {unseen[0]}'s cache")
    scales = {
        n: (torch.tensor([max(k, 1e-12) / FP8_E4M3_MAX]), torch.tensor([max(v, 1e-12) / FP8_E4M3_MAX]))
        for n, (k, v) in amax.items()
    }
    attach_kv_fp8_(model, scales)
    ks = [float(k) for k, _ in scales.values()]
    vs = [float(v) for _, v in scales.values()]
    return {
        "kv_cache": "fp8",
        "kv_cache_layers": len(scales),
        "k_scale_range": [min(ks), max(ks)],
        "v_scale_range": [min(vs), max(vs)],
    }
