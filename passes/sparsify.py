"""`sparsify`: 2:4 semi-structured sparsity by weight magnitude.

In every group of 4 consecutive weights along the input dimension, the 2 of smallest
magnitude are set to zero (Mishra et al., 2021, "Accelerating Sparse Deep Neural
Networks"): the pattern Ampere-and-later sparse tensor cores run at twice the dense
rate. The mask is kept as a ``weight_mask`` buffer on the layer so that distillation
(recovery) and quantization keep the zeros where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressor.adapters.base import ModelAdapter
from compressor.config import option
from compressor.errors import PassError, PlanError, RecipeError
from compressor.modules import select_modules
from compressor.pipeline import Pass, PassContext, register_pass
from compressor.targets import Target


@dataclass(frozen=True)
class SparsifyConfig:
    method: Literal["magnitude"] = option("magnitude", help="how weights are chosen: by magnitude")
    pattern: Literal["2:4"] = option("2:4", help="sparsity pattern along the input dimension")
    targets: tuple[str, ...] = option(("*",), help="module-name patterns of the Linear layers to sparsify")
    ignore: tuple[str, ...] = option((), help="module-name patterns to leave dense")

    def validate(self, path: str) -> None:
        if not self.targets:
            raise RecipeError(f"{path}.targets: give at least one pattern")


def mask_24_by_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask keeping the 2 largest |w| of every 4 along the last dim: [N, K] -> [N, K]."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 needs the input dimension to be a multiple of 4, got {k}")
    groups = weight.detach().abs().reshape(n, k // 4, 4)  # [N, K/4, 4]
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(n, k).to(weight.dtype)


def is_24_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 along the last dim has at most 2 non-zeros."""
    n, k = weight.shape
    if k % 4:
        return False
    nonzero = (weight.detach().reshape(n, k // 4, 4) != 0).sum(dim=-1)
    return bool((nonzero <= 2).all())


@torch.no_grad()
def apply_mask_(linear: nn.Module, mask: torch.Tensor) -> None:
    linear.weight.mul_(mask)
    if getattr(linear, "weight_mask", None) is None:
        linear.register_buffer("weight_mask", mask)
    else:
        linear.weight_mask = mask


@register_pass
class SparsifyPass(Pass):
    name = "sparsify"
    description = "2:4 semi-structured sparsity by magnitude over the selected Linear layers"
    Config = SparsifyConfig

    def check(self, model: nn.Module, target: Target, adapter: ModelAdapter) -> None:
        names = select_modules(model, self.config.targets, self.config.ignore, what="sparsify")
        bad = [n for n in names if model.get_submodule(n).in_features % 4]
        if bad:
            raise PlanError(
                f"sparsify: 2:4 needs in_features divisible by 4; not so for {', '.join(bad[:3])}"
            )

    def run(self, model: nn.Module, ctx: PassContext) -> None:
        names = select_modules(model, self.config.targets, self.config.ignore, what="sparsify")
        for n in names:
            lin = model.get_submodule(n)
            apply_mask_(lin, mask_24_by_magnitude(lin.weight))
        ctx.record("sparsified_layers", len(names))
        ctx.record(
            "speedup_on_target",
            "2:4 sparse tensor cores" if ctx.target.sparse_24 else "none (no 2:4 hardware)",
        )

    def ensures(self, model: nn.Module, ctx: PassContext) -> None:
        for n in select_modules(model, self.config.targets, self.config.ignore, what="sparsify"):
            if not is_24_sparse(model.get_submodule(n).weight):
                raise PassError(f"{n}: weight is not 2:4 sparse after sparsify")
