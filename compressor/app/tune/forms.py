"""The candidate forms of one Linear layer, as the tuner names, builds and writes them.

A form is what a recipe can make of a layer: float, int8 with one of three activation
schemes, int4 weight-only in groups of 32, 64 or 128, 2:4 sparse, or 2:4 and int8. Each
form knows the precision it needs (the target decides what is legal), how to build the
layer from a float ``nn.Linear`` with our own kernels' modules (the module the ``onnx``
exporter lowers, so a form is timed in exactly the graph a bundle ships), and the pass
options that produce it (``recipe``), so a chosen plan is written in the vocabulary
every recipe already uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.kernels.int4_linear import Int4Linear
from compressor.kernels.int8_linear import Int8Linear, static_input_scale


def _masked_24(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` with the 2 smallest of every 4 input weights zeroed (magnitude 2:4)."""
    from compressor.passes.sparsity.sparsify import apply_mask_, mask_24_by_magnitude

    out = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
    out.load_state_dict(linear.state_dict(), strict=False)
    with torch.no_grad():
        apply_mask_(out, mask_24_by_magnitude(out.weight.detach()))
    return out


def _int8(scheme: str) -> Callable[[nn.Linear, torch.Tensor | None], nn.Module]:
    def build(linear: nn.Linear, amax: torch.Tensor | None) -> nn.Module:
        scale = None
        if scheme == "static_per_tensor":
            scale = static_input_scale(amax if amax is not None else torch.tensor(4.0))
        return Int8Linear.from_linear(linear, scheme, input_scale=scale)

    return build


def _int4(group: int) -> Callable[[nn.Linear, torch.Tensor | None], nn.Module]:
    def build(linear: nn.Linear, amax: torch.Tensor | None) -> nn.Module:
        return Int4Linear.from_linear(linear, group_size=group)

    return build


@dataclass(frozen=True)
class LayerForm:
    """One candidate form of a Linear layer."""

    name: str  # "int8", "int4_g64", "2:4+int8", ...
    precision: str  # what the target must support: fp32, int8, int4
    sparse24: bool
    build: Callable[[nn.Linear, torch.Tensor | None], nn.Module]  # (float layer, input amax) -> module
    # the pass options that give a layer this form (the quantize pass's; sparse ones add sparsify)
    quantize: dict[str, Any] = field(default_factory=dict)
    group_size: int | None = None

    @property
    def is_float(self) -> bool:
        return self.precision == "fp32" and not self.sparse24

    @property
    def int8_scheme(self) -> str | None:
        """The activation scheme of a dense int8 form (what ``quantize_linears_`` takes)."""
        return self.quantize.get("activations") if self.precision == "int8" and not self.sparse24 else None


def _float(linear: nn.Linear, amax: torch.Tensor | None) -> nn.Module:
    return linear


def _sparse(linear: nn.Linear, amax: torch.Tensor | None) -> nn.Module:
    return _masked_24(linear)


def _sparse_int8(linear: nn.Linear, amax: torch.Tensor | None) -> nn.Module:
    return Int8Linear.from_linear(_masked_24(linear), "dynamic_per_tensor")


FORMS: dict[str, LayerForm] = {
    f.name: f
    for f in (
        LayerForm("float", "fp32", False, _float),
        LayerForm("int8", "int8", False, _int8("dynamic_per_tensor"), {"method": "int8", "activations": "dynamic_per_tensor"}),
        LayerForm(
            "int8_per_token", "int8", False, _int8("dynamic_per_token"),
            {"method": "int8", "activations": "dynamic_per_token"},
        ),
        LayerForm(
            "int8_static", "int8", False, _int8("static_per_tensor"),
            {"method": "int8", "activations": "static_per_tensor"},
        ),
        LayerForm("int4_g32", "int4", False, _int4(32), {"method": "int4", "group_size": 32}, 32),
        LayerForm("int4_g64", "int4", False, _int4(64), {"method": "int4", "group_size": 64}, 64),
        LayerForm("int4_g128", "int4", False, _int4(128), {"method": "int4", "group_size": 128}, 128),
        LayerForm("2:4", "fp32", True, _sparse),
        LayerForm("2:4+int8", "int8", True, _sparse_int8, {"method": "int8", "activations": "dynamic_per_tensor"}),
    )
}  # fmt: skip
"""Every form the tuner knows, float first."""


def legal_forms(target: Any, in_features: int, names: tuple[str, ...] | None = None) -> list[LayerForm]:
    """The forms of ``names`` (all by default) the target can run for a layer with
    ``in_features`` inputs: its precision supported there, int4 groups that divide the
    input, 2:4 on inputs divisible by 4. 2:4 stays a candidate on targets without sparse
    tensor cores: it is the measurement that has to show it is not faster."""
    out = []
    for f in FORMS.values():
        if names is not None and f.name not in names:
            continue
        if not target.supports(f.precision):
            continue
        if f.group_size is not None and in_features % f.group_size:
            continue
        if f.sparse24 and in_features % 4:
            continue
        out.append(f)
    return out
