"""INT4 weight-only quantization into ``Int4Linear``: RTN, GPTQ or AWQ (+ RTN).

- ``rtn``: group-wise round to nearest, data-free (``compressor.passes.int4``).
- ``gptq``: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers" (ICLR 2023): columns quantized one at a time, the error
  compensated on the rest through the inverse Hessian of the layer's calibration
  inputs. Calibrated block by block (``compress_linears_sequentially``), so the error
  of earlier blocks reaches the inputs later blocks are calibrated on, and only one
  block's activations are held at a time.
- ``awq``: Lin et al., "AWQ: Activation-aware Weight Quantization" (MLSys 2024): per
  group of Linears reading one activation, scales ``mean|x|^α`` searched on the
  calibration data are folded into the norm that produces the activation, then RTN.
  Groups with a foldable producer (pre-norm decoders: q/k/v after ``input_layernorm``,
  gate/up after ``post_attention_layernorm``) get their scales folded into the norm; the
  others (post-LN BERT, o_proj, down_proj) keep them as the layer's input divisor (one
  ``Div`` at run time; ``awq_explicit_scales: false`` quantizes them by plain RTN
  instead). The decision is recorded per layer.

Every selected Linear becomes an ``Int4Linear`` holding packed codes (the W4A16 Triton
kernel on CUDA, ``MatMulNBits`` in ONNX Runtime). Symmetric groups keep zeros zero, so
a 2:4 mask survives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compressor.modules import get_linear, set_module
from compressor.passes.int4 import QuantizedWeight, quantize_rtn

log = logging.getLogger(__name__)

INT4_ALGORITHMS: tuple[str, ...] = ("rtn", "gptq", "awq")
_AWQ_MAX_ROWS = 4096  # calibration rows kept per activation for the AWQ search


def _mask(linear: nn.Module) -> torch.Tensor | None:
    mask = getattr(linear, "weight_mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


def _rtn(linear: nn.Linear, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    w = linear.weight.detach().float()
    mask = _mask(linear)
    if mask is not None:  # symmetric codes keep pruned weights exactly zero
        return quantize_rtn(w * mask, bits=4, group_size=group_size, symmetric=True)
    return quantize_rtn(w, bits=4, group_size=group_size, symmetric=symmetric)


@torch.no_grad()
def _gptq_weights(
    model: nn.Module,
    names: Sequence[str],
    calibration: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    group_size: int | None,
    symmetric: bool,
    percdamp: float,
) -> dict[str, QuantizedWeight]:
    from compressor.passes.gptq import gptq_quantize
    from compressor.passes.sequential import compress_linears_sequentially
    from compressor.passes.structure import describe_model

    chosen = {id(get_linear(model, n)): n for n in names}
    out: dict[str, QuantizedWeight] = {}
    try:
        blocks = list(describe_model(model).layers)
    except ValueError:
        log.info("int4 gptq: no transformer block list found; RTN for every layer")
        return out

    def compress(_name: str, linear: nn.Linear, hessian: torch.Tensor) -> None:
        qw = gptq_quantize(linear.weight, hessian, 4, group_size, symmetric, percdamp=percdamp)
        # later blocks calibrate on what the quantized layer will compute
        linear.weight.copy_(qw.dequantize().to(linear.weight.dtype))
        out[chosen[id(linear)]] = qw

    compress_linears_sequentially(
        model, blocks, calibration, forward, compress, lambda _n, m: id(m) in chosen
    )
    return out


@torch.no_grad()
def _awq_fold_(
    model: nn.Module,
    names: Sequence[str],
    groups: Sequence[Any],
    calibration: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    group_size: int | None,
    symmetric: bool,
    explicit_scales: dict[str, torch.Tensor] | None,
) -> dict[str, float]:
    """Search AWQ scales per group of Linears reading one activation; fold them into the
    producing norm where there is one, else (``explicit_scales`` given) keep them as the
    layers' input divisor, collected in ``explicit_scales``; returns {layer: α}."""
    from compressor.passes.awq import awq_search_scales
    from compressor.passes.smoothquant import fold_input_scale_

    selected = set(names)
    candidates = [g for g in groups if g.linears and all(n in selected for n in g.linears)]
    foldable = [g for g in candidates if g.producer is not None or explicit_scales is not None]
    if not foldable:
        return {}
    inputs: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in foldable}
    handles = []
    for first in inputs:

        def hook(_m: nn.Module, args: tuple[Any, ...], key: str = first) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            inputs[key].append(rows[: max(_AWQ_MAX_ROWS - sum(len(r) for r in inputs[key]), 0)])

        handles.append(get_linear(model, first).register_forward_pre_hook(hook))
    try:
        for b in calibration:
            forward(model, b)
    finally:
        for h in handles:
            h.remove()
    alphas: dict[str, float] = {}
    for g in foldable:
        x = torch.cat(inputs[g.linears[0]])
        linears = [get_linear(model, n) for n in g.linears]
        s, alpha, _ = awq_search_scales(x, [lin.weight for lin in linears], 4, group_size, symmetric)
        if g.producer is not None:
            fold_input_scale_(model.get_submodule(g.producer), linears, s)
        else:  # W · diag(s), and the layer divides its input by s at run time
            assert explicit_scales is not None
            with torch.no_grad():
                for n, lin in zip(g.linears, linears):
                    lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
                    explicit_scales[n] = s.detach().float().clone()
        alphas.update({n: alpha for n in g.linears})
    return alphas


def quantize_int4_(
    model: nn.Module,
    names: Sequence[str],
    algorithm: str,
    group_size: int | None,
    symmetric: bool,
    calibration: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    smooth_groups: Sequence[Any] = (),
    percdamp: float = 0.01,
    awq_explicit_scales: bool = True,
) -> dict[str, str]:
    """Replace the named Linears with ``Int4Linear``; returns how each layer was quantized."""
    from compressor.kernels.int4_linear import Int4Linear

    if algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"int4 algorithm {algorithm!r} is not one of {', '.join(INT4_ALGORITHMS)}")
    decisions: dict[str, str] = {}
    quantized: dict[str, QuantizedWeight] = {}
    # GPTQ's error feedback and AWQ's rescaling would move pruned (2:4-masked) weights off
    # zero: masked layers take symmetric RTN
    dense = [n for n in names if _mask(get_linear(model, n)) is None]
    explicit: dict[str, torch.Tensor] = {}
    if algorithm == "gptq":
        quantized = _gptq_weights(model, dense, calibration, forward, group_size, symmetric, percdamp)
        decisions.update({n: "gptq" for n in quantized})
    elif algorithm == "awq":
        alphas = _awq_fold_(
            model, dense, smooth_groups, calibration, forward, group_size, symmetric,
            explicit if awq_explicit_scales else None,
        )  # fmt: skip
        decisions.update(
            {n: f"awq (alpha {a:.2f}{', input divisor' if n in explicit else ''})" for n, a in alphas.items()}
        )
    for name in names:
        linear = get_linear(model, name)
        qw = quantized.get(name) or _rtn(linear, group_size, symmetric)
        decisions.setdefault(name, "rtn" if _mask(linear) is None else "rtn (2:4 mask kept)")
        bias = None if linear.bias is None else linear.bias.detach()
        set_module(model, name, Int4Linear.from_quantized(qw, bias, smooth=explicit.get(name)))
    return decisions
