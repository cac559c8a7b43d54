"""INT4 weight-only quantization into ``Int4Linear``: RTN, GPTQ or AWQ (+ RTN).

- ``rtn``: group-wise round to nearest, data-free (``compressor.kernels.int4_format``).
- ``gptq``: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers" (ICLR 2023): columns quantized one at a time, the error
  compensated on the rest through the inverse Hessian of the layer's calibration
  inputs. Calibrated block by block (``compress_linears_sequentially``), so the error
  of earlier blocks reaches the inputs later blocks are calibrated on, and only one
  block's activations are held at a time.
- ``awq``: Lin et al., "AWQ: Activation-aware Weight Quantization" (MLSys 2024), the
  math in ``compressor.passes.quantize.awq``: per group of Linears reading one activation,
  scales (``mean|x|^α``, or ``mean|x|^α / mean|ŵ|^(1-α)``) searched on the calibration
  data, then a clipping ratio per output row and group (``awq_clip``), then RTN.
  Calibrated block by block like GPTQ: each block is searched on the inputs the already
  quantized blocks produce. Groups with a foldable producer (pre-norm decoders: q/k/v
  after ``input_layernorm``, gate/up after ``post_attention_layernorm``) share scales
  folded into the norm; layers with no norm to fold into (post-LN BERT, o_proj,
  down_proj) get scales of their own, kept as the layer's input divisor (one ``Div`` at
  run time; ``awq_explicit_scales: false`` gives them RTN with clipping instead). The
  decision is recorded per layer.

Every selected Linear becomes an ``Int4Linear`` holding packed codes (the W4A16 Triton
kernel on CUDA, ``MatMulNBits`` in ONNX Runtime). Symmetric groups keep zeros zero, so
a 2:4 mask survives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.kernels.int4_format import QuantizedWeight, quantize_rtn
from compressor.kernels.int4_linear import Int4Linear
from compressor.modules import get_linear, set_module
from compressor.passes.common.sequential import feed_linear_inputs
from compressor.passes.quantize.awq import InputStats, awq_search_clip, awq_search_scales_from_stats

log = logging.getLogger(__name__)

INT4_ALGORITHMS: tuple[str, ...] = ("rtn", "gptq", "awq")


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
    from compressor.passes.common.sequential import compress_linears_sequentially
    from compressor.passes.prune.structure import describe_model
    from compressor.passes.quantize.gptq import gptq_quantize

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


@dataclass(frozen=True)
class _AwqUnit:
    """Linears that read one activation and share one set of AWQ scales (``scaled``), folded
    into ``producer`` when there is one; ``scaled`` false = RTN with the clipping search."""

    linears: tuple[str, ...]
    producer: str | None
    scaled: bool


def _awq_units(
    names: Sequence[str], groups: Sequence[Any], explicit_scales: bool, clip: bool
) -> list[_AwqUnit]:
    """Foldable groups share scales (one norm absorbs them); layers that divide their own
    input get their own scales (a shared divisor could only do worse on each layer's
    error, and each layer's ``Div`` costs the same); the rest get clipping alone."""
    selected = set(names)
    units: list[_AwqUnit] = []
    for g in groups:
        if not g.linears or not all(n in selected for n in g.linears):
            continue
        if g.producer is not None:
            units.append(_AwqUnit(tuple(g.linears), g.producer, True))
        elif explicit_scales:
            units.extend(_AwqUnit((n,), None, True) for n in g.linears)
    covered = {n for u in units for n in u.linears}
    if clip:
        units.extend(_AwqUnit((n,), None, False) for n in names if n not in covered)
    return units


def _collect_input_stats(
    model: nn.Module, units: Sequence[_AwqUnit], run: Callable[[], None]
) -> dict[str, InputStats]:
    """``InputStats`` of the input of each unit's first Linear over what ``run`` feeds."""
    stats: dict[str, InputStats] = {}
    for u in units:
        lin = get_linear(model, u.linears[0])
        stats[u.linears[0]] = InputStats(lin.in_features, lin.weight.device)
    feed_linear_inputs(model, {name: st.add for name, st in stats.items()}, run)
    return stats


@torch.no_grad()
def _awq_quantize_unit_(
    model: nn.Module,
    unit: _AwqUnit,
    stats: InputStats,
    group_size: int | None,
    symmetric: bool,
    clip: bool,
    out: dict[str, QuantizedWeight],
    explicit: dict[str, torch.Tensor],
) -> dict[str, str]:
    """Search the unit's scales and clipping, quantize its Linears into ``out`` (scales kept
    as input divisors go into ``explicit``), and leave in each Linear the weight it will
    compute with, so later blocks calibrate on the quantized model. Returns the decisions."""
    from compressor.passes.quantize.smoothquant import fold_input_scale_

    linears = [get_linear(model, n) for n in unit.linears]
    weights = [lin.weight.detach().float().clone() for lin in linears]  # folding scales them in place
    s = torch.ones_like(stats.abs_mean)
    how = "rtn"
    if unit.scaled:
        found = awq_search_scales_from_stats(stats, weights, 4, group_size, symmetric)
        form = f"x^{found.alpha:.2f}" + (f"/w^{1 - found.alpha:.2f}" if found.duo else "")
        how = f"awq (alpha {found.alpha:.2f}, s = {form}"
        if not found.is_identity:
            s = found.scales
    divide = unit.producer is None and unit.scaled and not bool((s == 1).all())
    if unit.producer is not None and unit.scaled:
        fold_input_scale_(model.get_submodule(unit.producer), linears, s.to(linears[0].weight.dtype))
    gram = stats.gram / s[:, None] / s[None, :]  # the Gram matrix of the scaled input X / s
    decisions = {}
    for n, lin, w in zip(unit.linears, linears, weights):
        ws = w * s[None, :]
        ratios = awq_search_clip(ws, gram, 4, group_size, symmetric) if clip else None
        qw = quantize_rtn(ws, 4, group_size, symmetric, 1.0 if ratios is None else ratios)
        out[n] = qw
        eff = qw.dequantize() / s[None, :] if divide else qw.dequantize()
        lin.weight.copy_(eff.to(lin.weight.dtype))
        if divide:
            explicit[n] = s.detach().float().clone()
        parts = [how] if unit.scaled else []
        if ratios is not None:
            parts.append(f"clip {float((ratios < 1).float().mean()):.0%} of groups")
        if divide:
            parts.append("input divisor")
        if unit.scaled:
            decisions[n] = ", ".join(parts) + ")"
        else:
            decisions[n] = "rtn" + (f" ({', '.join(parts)})" if parts else "")
    return decisions


@torch.no_grad()
def _awq_weights(
    model: nn.Module,
    names: Sequence[str],
    groups: Sequence[Any],
    calibration: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any],
    group_size: int | None,
    symmetric: bool,
    explicit_scales: bool,
    clip: bool,
) -> tuple[dict[str, QuantizedWeight], dict[str, str], dict[str, torch.Tensor]]:
    """AWQ block by block (``sequential_calibrate``): each block's units are searched on the
    inputs the already quantized blocks before it produce. Units outside the block list
    (or every unit, for a model without one) are searched on one whole-model pass at the
    end. Returns (quantized weights, decisions, input divisors)."""
    from compressor.passes.common.sequential import BlockInput, sequential_calibrate
    from compressor.passes.prune.structure import describe_model

    units = _awq_units(names, groups, explicit_scales, clip)
    out: dict[str, QuantizedWeight] = {}
    explicit: dict[str, torch.Tensor] = {}
    decisions: dict[str, str] = {}
    try:
        blocks = list(describe_model(model).layers)
    except ValueError:
        blocks = []
    owner = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    per_block: dict[int, list[_AwqUnit]] = {}
    rest: list[_AwqUnit] = []
    for u in units:
        where = {owner.get(id(get_linear(model, n)), -1) for n in u.linears}
        i = where.pop() if len(where) == 1 else -1
        if i >= 0:
            per_block.setdefault(i, []).append(u)
        else:
            rest.append(u)

    def quantize(todo: Sequence[_AwqUnit], run: Callable[[], None]) -> None:
        stats = _collect_input_stats(model, todo, run)
        for u in todo:
            decisions.update(
                _awq_quantize_unit_(model, u, stats[u.linears[0]], group_size, symmetric, clip, out, explicit)
            )

    def block_step(i: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        def run_block() -> None:
            for b in inputs:
                block(*b.args, **b.kwargs)

        if i in per_block:
            quantize(per_block[i], run_block)

    def run_model() -> None:
        for b in calibration:
            forward(model, b)

    if per_block:
        sequential_calibrate(model, blocks, calibration, forward, block_step)
    if rest:
        quantize(rest, run_model)
    return out, decisions, explicit


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
    awq_clip: bool = True,
) -> dict[str, str]:
    """Replace the named Linears with ``Int4Linear``; returns how each layer was quantized."""
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
        quantized, found, explicit = _awq_weights(
            model, dense, smooth_groups, calibration, forward, group_size, symmetric,
            awq_explicit_scales, awq_clip,
        )  # fmt: skip
        decisions.update(found)
    for name in names:
        linear = get_linear(model, name)
        qw = quantized.get(name) or _rtn(linear, group_size, symmetric)
        decisions.setdefault(name, "rtn" if _mask(linear) is None else "rtn (2:4 mask kept)")
        bias = None if linear.bias is None else linear.bias.detach()
        set_module(model, name, Int4Linear.from_quantized(qw, bias, smooth=explicit.get(name)))
    return decisions
