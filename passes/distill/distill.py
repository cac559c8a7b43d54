"""`distill`: recovery by knowledge distillation from the original model.

A thin pass around ``compressor.distill.loop.distill_`` (SquareHead per-layer loss plus an
output loss; masks and quantizer scales stay fixed). Placed after ``quantize`` it is
quantization-aware distillation (Polino et al., 2018, "Model compression via
distillation and quantization"): the int8 layers train their float master weights
through a straight-through estimator. With ``checkpoint_every`` it checkpoints into the
pass's work dir and resumes there (``compressor compile --work-dir DIR``); under
``torchrun`` it trains data-parallel (see ``compressor.distill.loop``).
"""

from __future__ import annotations

from torch import nn

from compressor.distill.config import RecoverConfig
from compressor.distill.loop import distill_
from compressor.errors import DataError
from compressor.pipeline import Pass, PassContext, PassOutput, register_pass
from compressor.planning import PlanState


@register_pass
class DistillPass(Pass[RecoverConfig]):
    name = "distill"
    description = "recover fidelity by distillation from the original model (masks and quantizers fixed)"
    Config = RecoverConfig

    def requires(self, model: nn.Module, ctx: PassContext) -> None:
        if not ctx.data.train:
            raise DataError("distill: no training data (data.train_samples is 0)")

    def plan(self, state: PlanState) -> PlanState:
        """Distillation trains weights in place: no layer changes shape, form or sparsity (the
        masks and quantizer scales stay fixed), so the state is unchanged."""
        return state

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        losses = distill_(
            model, ctx.teacher, ctx.adapter, ctx.data.train, self.config, ctx.progress, work_dir=ctx.work_dir
        )
        tail = losses[-max(1, len(losses) // 10) :]
        details = {
            "loss_first": round(losses[0], 6),
            "loss_last": round(losses[-1], 6),
            "loss_tail_mean": round(sum(tail) / len(tail), 6),
        }
        return PassOutput(model, details)
