"""`sparsify`: 2:4 semi-structured sparsity, by magnitude or by SparseGPT.

In every group of 4 consecutive weights along the input dimension, 2 are set to zero
(Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks"): the pattern
Ampere-and-later sparse tensor cores run at twice the dense rate. ``magnitude`` drops
the 2 smallest; ``sparsegpt`` (Frantar & Alistarh, 2023) chooses and compensates with
the inverse Hessian of each layer's calibration inputs, calibrating one transformer
block at a time (``compressor.passes.sequential``). The mask is kept as a ``weight_mask`` buffer on the layer so that distillation
(recovery) and quantization keep the zeros where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compressor.adapters.base import ModelAdapter
from compressor.config import option
from compressor.distill import RecoverConfig
from compressor.errors import PassError, PlanError, RecipeError
from compressor.modules import get_linear, select_modules
from compressor.pipeline import Pass, PassContext, register_pass
from compressor.targets import Target


@dataclass(frozen=True)
class SparsifyConfig:
    method: Literal["magnitude", "sparsegpt"] = option(
        "magnitude", help="magnitude, or sparsegpt (Hessian-compensated, one block at a time)"
    )
    blocksize: int = option(128, help="sparsegpt: columns processed per block")
    percdamp: float = option(0.01, help="sparsegpt: Hessian dampening, as a fraction of its mean diagonal")
    pattern: Literal["2:4"] = option("2:4", help="sparsity pattern along the input dimension")
    targets: tuple[str, ...] = option(("*",), help="module-name patterns of the Linear layers to sparsify")
    ignore: tuple[str, ...] = option((), help="module-name patterns to leave dense")
    recover: RecoverConfig | None = option(
        None, help="distill against the original model right after this pass (steps, lr, loss)"
    )

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
def apply_mask_(linear: nn.Linear, mask: torch.Tensor) -> None:
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
        bad = [n for n in names if get_linear(model, n).in_features % 4]
        if bad:
            raise PlanError(
                f"sparsify: 2:4 needs in_features divisible by 4; not so for {', '.join(bad[:3])}"
            )

    def run(self, model: nn.Module, ctx: PassContext) -> None:
        names = select_modules(model, self.config.targets, self.config.ignore, what="sparsify")
        if self.config.method == "sparsegpt":
            self._run_sparsegpt(model, ctx, names)
            return
        for n in names:
            lin = get_linear(model, n)
            apply_mask_(lin, mask_24_by_magnitude(lin.weight))
        ctx.record("sparsified_layers", len(names))
        ctx.record(
            "speedup_on_target",
            "2:4 sparse tensor cores" if ctx.target.sparse_24 else "none (no 2:4 hardware)",
        )

    def _run_sparsegpt(self, model: nn.Module, ctx: PassContext, names: list[str]) -> None:
        from compressor.passes.sequential import compress_linears_sequentially
        from compressor.passes.sparsegpt import sparsegpt_prune
        from compressor.passes.structure import describe_model

        try:
            blocks = describe_model(model).layers
        except ValueError as e:
            raise PassError(f"sparsify: sparsegpt calibrates block by block and {e}") from None
        chosen = {id(get_linear(model, n)): n for n in names}
        done: list[str] = []

        @torch.no_grad()
        def compress(_name: str, linear: nn.Linear, hessian: torch.Tensor) -> None:
            w, keep = sparsegpt_prune(
                linear.weight,
                hessian,
                prune_n=2,
                prune_m=4,
                blocksize=self.config.blocksize,
                percdamp=self.config.percdamp,
            )
            linear.weight.copy_(w)
            apply_mask_(linear, keep.to(linear.weight.dtype))
            done.append(chosen[id(linear)])

        compress_linears_sequentially(
            model,
            list(blocks),
            ctx.data.calibration,
            ctx.adapter.forward,
            compress,
            lambda _n, m: id(m) in chosen,
        )
        rest = [n for n in names if n not in set(done)]  # selected layers outside the blocks
        for n in rest:
            lin = get_linear(model, n)
            apply_mask_(lin, mask_24_by_magnitude(lin.weight))
        ctx.record("sparsegpt_layers", len(done))
        ctx.record("magnitude_layers", rest)

    def ensures(self, model: nn.Module, ctx: PassContext) -> None:
        for n in select_modules(model, self.config.targets, self.config.ignore, what="sparsify"):
            if not is_24_sparse(get_linear(model, n).weight):
                raise PassError(f"{n}: weight is not 2:4 sparse after sparsify")
