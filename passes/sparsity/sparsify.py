"""`sparsify`: 2:4 semi-structured sparsity, by magnitude or by SparseGPT.

In every group of 4 consecutive weights along the input dimension, 2 are set to zero
(Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks"): the pattern
Ampere-and-later sparse tensor cores run at twice the dense rate. ``magnitude`` drops
the 2 smallest; ``sparsegpt`` (Frantar & Alistarh, 2023) chooses and compensates with
the inverse Hessian of each layer's calibration inputs, calibrating one transformer
block at a time (``compressor.passes.common.sequential``). The mask is kept as a ``weight_mask`` buffer on the layer so that distillation
(recovery) and quantization keep the zeros where they are.

Mixed sparsity (``max_dense_layers``, optionally with ``fidelity_budget``): after every
selected layer is made 2:4, each layer's sensitivity is the calibration fidelity lost
when only it is sparse; the most sensitive go back to their dense weights, one at a
time, re-measuring, until the calibration mean cosine vs the original model is within
the budget or ``max_dense_layers`` are dense (``compressor.passes.quantize.mixed_precision``, the
same greedy search as the quantize pass's float layers). The manifest records every
layer's choice and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from compressor.config import option
from compressor.distill.config import RecoverConfig
from compressor.errors import PassError, PlanError, RecipeError
from compressor.kernels.sparse24_format import is_24_sparse
from compressor.modules import get_linear, select_modules
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import FLOAT, PlanState


@dataclass(frozen=True)
class SparsifyConfig:
    method: Literal["magnitude", "sparsegpt"] = option(
        "magnitude", help="magnitude, or sparsegpt (Hessian-compensated, one block at a time)"
    )
    blocksize: int = option(128, help="sparsegpt: columns processed per block", ge=1, le=65_536)
    percdamp: float = option(
        0.01, help="sparsegpt: Hessian dampening, as a fraction of its mean diagonal", ge=0.0, le=1.0
    )
    pattern: Literal["2:4"] = option("2:4", help="sparsity pattern along the input dimension")
    targets: tuple[str, ...] = option(
        ("*",), help="module-name patterns of the Linear layers to sparsify", patterns=True
    )
    ignore: tuple[str, ...] = option((), help="module-name patterns to leave dense", patterns=True)
    max_dense_layers: int = option(
        0, help="mixed sparsity: at most this many of the most sensitive layers go back to dense"
    )
    fidelity_budget: float | None = option(
        None,
        help="mixed sparsity: the drop in calibration mean cosine (vs the original model) this pass may "
        "cause, from the model it receives; sensitive layers go back to dense until it holds (at most "
        "max_dense_layers); null = exactly max_dense_layers",
    )
    calibration_batches: int = option(
        4, help="mixed sparsity: calibration batches for the fidelity measure", ge=1, le=10_000
    )
    recover: RecoverConfig | None = option(
        None, help="distill against the original model right after this pass (steps, lr, loss)"
    )

    def validate(self, path: str) -> None:
        if not self.targets:
            raise RecipeError(f"{path}.targets: give at least one pattern")
        if self.max_dense_layers < 0:
            raise RecipeError(f"{path}.max_dense_layers: must not be negative, got {self.max_dense_layers}")
        if self.fidelity_budget is not None:
            if not 0.0 <= self.fidelity_budget < 1.0:
                raise RecipeError(
                    f"{path}.fidelity_budget: {self.fidelity_budget} is not in [0, 1) (the allowed drop in "
                    "mean cosine, e.g. 0.02)"
                )
            if self.max_dense_layers == 0:
                raise RecipeError(
                    f"{path}.fidelity_budget: needs max_dense_layers > 0 (how many layers may stay dense)"
                )
        if self.calibration_batches < 1:
            raise RecipeError(f"{path}.calibration_batches: must be at least 1")


def mask_24_by_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """A {0, 1} mask keeping the 2 largest |w| of every 4 along the last dim: [N, K] -> [N, K]."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 needs the input dimension to be a multiple of 4, got {k}")
    groups = weight.detach().abs().reshape(n, k // 4, 4)  # [N, K/4, 4]
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(n, k).to(weight.dtype)


@torch.no_grad()
def apply_mask_(linear: nn.Linear, mask: torch.Tensor) -> None:
    linear.weight.mul_(mask)
    if getattr(linear, "weight_mask", None) is None:
        linear.register_buffer("weight_mask", mask)
    else:
        linear.weight_mask = mask


@register_pass
class SparsifyPass(Pass[SparsifyConfig]):
    name = "sparsify"
    description = (
        "2:4 semi-structured sparsity over the selected Linear layers, by magnitude or SparseGPT "
        "(Hessian-compensated, block by block); optional mixed sparsity"
    )
    Config = SparsifyConfig

    def plan(self, state: PlanState) -> PlanState:
        """Every selected layer becomes 2:4 (``sparse24``). Only float layers are candidates: a
        quantized layer is no ``nn.Linear`` when this pass runs. Which layers mixed sparsity puts
        back to dense is only known at run time, so all selected ones are marked."""
        floats = state.replace(linears={n: lin for n, lin in state.linears.items() if lin.form == FLOAT})
        names = floats.select(self.config.targets, self.config.ignore, what="sparsify")
        bad = [n for n in names if state.linears[n].in_features % 4]
        if bad:
            raise PlanError(
                f"sparsify: 2:4 needs in_features divisible by 4; not so for {', '.join(bad[:3])}"
            )
        return state.with_linears(
            {n: dataclasses.replace(state.linears[n], sparse24=True, by=state.where) for n in names}
        )

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        names = select_modules(model, self.config.targets, self.config.ignore, what="sparsify")
        dense = (
            {n: get_linear(model, n).weight.detach().clone() for n in names}
            if self.config.max_dense_layers
            else {}
        )
        details: dict[str, Any] = {}
        if self.config.method == "sparsegpt":
            details.update(self._run_sparsegpt(model, ctx, names))
        else:
            for n in names:
                lin = get_linear(model, n)
                apply_mask_(lin, mask_24_by_magnitude(lin.weight))
        dense_layers: list[str] = []
        if dense:
            mixed = self._mixed_sparsity(model, ctx, names, dense)
            dense_layers = mixed.pop("dense_layers")
            details.update(mixed)
        details["sparsified_layers"] = len(names) - len(dense_layers)
        details["dense_layers"] = dense_layers
        details["speedup_on_target"] = (
            "2:4 sparse tensor cores" if ctx.target.sparse_24 else "none (no 2:4 hardware)"
        )
        return PassOutput(model, details)

    def _mixed_sparsity(
        self, model: nn.Module, ctx: PassContext, names: list[str], dense: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Put the most sensitive layers back to dense (``plan_mixed_precision``); returns them
        (``dense_layers``) and the details of the search (``per_layer``, ``mixed_sparsity``)."""
        from compressor.passes.quantize.int8_math import mean_cosine, output_rows
        from compressor.passes.quantize.mixed_precision import budget_target, plan_mixed_precision
        from compressor.progress import open_progress

        cfg = self.config
        adapter, cal = ctx.adapter, ctx.data.calibration[: cfg.calibration_batches]
        sparse = {n: get_linear(model, n).weight.detach().clone() for n in names}
        with torch.no_grad():
            reference = output_rows([adapter.forward(ctx.teacher, b) for b in cal])

        @torch.no_grad()
        def fidelity_with_dense(keep: Sequence[str]) -> float:
            kept = set(keep)
            for n in names:
                get_linear(model, n).weight.copy_(dense[n] if n in kept else sparse[n])
            try:
                return mean_cosine(output_rows([adapter.forward(model, b) for b in cal]), reference)
            finally:
                for n in kept:
                    get_linear(model, n).weight.copy_(sparse[n])
                bar.update(1)

        was_training = model.training
        model.eval()
        evals = 2 + len(names) + cfg.max_dense_layers  # at most: the greedy search may stop early
        bar = open_progress(ctx.progress, "sparsify: mixed sparsity evals", evals, "eval")
        try:
            target = None
            if cfg.fidelity_budget is not None:  # a drop from the model as it came in (all layers dense)
                target = budget_target(cfg.fidelity_budget, fidelity_with_dense(names))
            plan = plan_mixed_precision(
                names, fidelity_with_dense, cfg.max_dense_layers, target, "2:4", "dense"
            )
        finally:
            bar.close()
            model.train(was_training)
        with torch.no_grad():
            for n in plan.keep_float:
                lin = get_linear(model, n)
                lin.weight.copy_(dense[n])
                del lin.weight_mask  # a dense layer: distillation and quantization keep it dense
        details: dict[str, Any] = {"dense_layers": list(plan.keep_float), "per_layer": plan.per_layer}
        if target is not None:
            details["mixed_sparsity"] = {
                "target": target.label,
                "reached": plan.reached,
                "mean_cosine_by_dense_layers": [round(c, 6) for c in plan.trace],
            }
        return details

    def _run_sparsegpt(self, model: nn.Module, ctx: PassContext, names: list[str]) -> dict[str, Any]:
        """SparseGPT over the selected layers inside the blocks, magnitude over the rest; returns
        the details (``sparsegpt_layers``, ``magnitude_layers``)."""
        from compressor.passes.common.sequential import compress_linears_sequentially
        from compressor.passes.prune.structure import describe_model
        from compressor.passes.sparsity.sparsegpt import sparsegpt_prune

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
            bar.update(1)

        with ctx.progress_bar("sparsify: sparsegpt layers", len(names), "layer") as bar:
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
        return {"sparsegpt_layers": len(done), "magnitude_layers": rest}

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        dense = set(out.details.get("dense_layers", []))
        for n in select_modules(out.model, self.config.targets, self.config.ignore, what="sparsify"):
            if n not in dense and not is_24_sparse(get_linear(out.model, n).weight):
                raise PassError(f"{n}: weight is not 2:4 sparse after sparsify")
