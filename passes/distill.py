"""`distill`: recovery by knowledge distillation from the original model.

A thin pass around ``compressor.distill.distill_`` (SquareHead per-layer loss plus an
output loss; masks and quantizer scales stay fixed). Placed after ``quantize`` it is
quantization-aware distillation (Polino et al., 2018, "Model compression via
distillation and quantization"): the int8 layers train their float master weights
through a straight-through estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compressor.config import option
from compressor.distill import DistillLossConfig, RecoverConfig, distill_
from compressor.errors import DataError, RecipeError
from compressor.pipeline import Pass, PassContext, register_pass


@dataclass(frozen=True)
class DistillConfig:
    steps: int = option(100, help="optimizer steps")
    lr: float = option(1e-5, help="peak learning rate (AdamW), linear warm-up then cosine decay")
    warmup_steps: int = option(10, help="linear warm-up steps")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    grad_clip: float = option(1.0, help="clip the gradient norm to this (0 = off)")
    loss: DistillLossConfig = option(DistillLossConfig(), help="what the student matches")

    def validate(self, path: str) -> None:
        self.recover_config().validate(path)

    def recover_config(self) -> RecoverConfig:
        return RecoverConfig(
            steps=self.steps,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            loss=self.loss,
        )


@register_pass
class DistillPass(Pass):
    name = "distill"
    description = "recover fidelity by distillation from the original model (masks and quantizers fixed)"
    Config = DistillConfig

    def requires(self, model: nn.Module, ctx: PassContext) -> None:
        if not ctx.data.train:
            raise DataError("distill: no training data (data.train_samples is 0)")
        if self.config.warmup_steps > self.config.steps:
            raise RecipeError("distill.warmup_steps: larger than steps")

    def run(self, model: nn.Module, ctx: PassContext) -> None:
        losses = distill_(
            model, ctx.teacher, ctx.adapter, ctx.data.train, self.config.recover_config(), ctx.progress
        )
        ctx.record("loss_first", round(losses[0], 6))
        ctx.record("loss_last", round(losses[-1], 6))
        tail = losses[-max(1, len(losses) // 10) :]
        ctx.record("loss_tail_mean", round(sum(tail) / len(tail), 6))
