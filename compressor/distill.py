"""The distillation engine: recovery for every lossy pass.

The student is trained to match the frozen teacher on real text with
- an output loss on the adapter's output (cosine or MSE on sentence embeddings), and
- a SquareHead-style per-layer loss (Kurtic et al., 2023, "Sparse Fine-tuning for
  Inference Acceleration of Large Language Models"): for each layer,
  ``||h_s - h_t||² / ||h_t||²`` over real tokens, so every layer's scale counts alike.
  When depth was pruned, student layer ``i`` of ``Ls`` matches teacher layer
  ``round((i + 1) · Lt / Ls) - 1``.

What the earlier passes fixed stays fixed: 2:4 masks are re-applied after every
step (and masked gradients zeroed, so optimizer state never revives a pruned
weight); quantizer scales are buffers, never trained, while int8 layers train their
float master weights through a straight-through estimator (quantization-aware
distillation). Dropout is off: the student runs in eval mode with gradients on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter
from compressor.config import option
from compressor.errors import DataError, RecipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillLossConfig:
    output: Literal["cosine", "mse"] = option("cosine", help="loss on the model output (embedding)")
    output_weight: float = option(1.0, help="weight of the output loss")
    hidden_weight: float = option(
        1.0, help="weight of the per-layer normalised hidden-state loss (SquareHead)"
    )

    def validate(self, path: str) -> None:
        if self.output_weight < 0 or self.hidden_weight < 0 or self.output_weight + self.hidden_weight == 0:
            raise RecipeError(f"{path}: loss weights must be non-negative and not both zero")


@dataclass(frozen=True)
class RecoverConfig:
    steps: int = option(100, help="optimizer steps")
    lr: float = option(1e-5, help="peak learning rate (AdamW), linear warm-up then cosine decay")
    warmup_steps: int = option(10, help="linear warm-up steps")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    grad_clip: float = option(1.0, help="clip the gradient norm to this (0 = off)")
    loss: DistillLossConfig = option(DistillLossConfig(), help="what the student matches")

    def validate(self, path: str) -> None:
        if self.steps < 1:
            raise RecipeError(f"{path}.steps: must be at least 1")
        if not 0 < self.lr < 1:
            raise RecipeError(f"{path}.lr: {self.lr} is not in (0, 1)")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise RecipeError(f"{path}: warmup_steps, grad_clip and weight_decay must not be negative")


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer index matched by each student layer (identity when depths agree)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def squarehead_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||² / ||h_t||² on real tokens ([B, T, D] each)."""
    idx = layer_map(len(student), len(teacher))
    losses = []
    for s, j in zip(student, idx):
        t = teacher[j]
        m = token_mask[..., None].to(s.dtype) if token_mask is not None else torch.ones_like(s[..., :1])
        num = ((s - t) ** 2 * m).sum()
        den = (t**2 * m).sum().clamp(min=1e-12)
        losses.append(num / den)
    return torch.stack(losses).mean()


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def distill_loss(
    student: nn.Module, teacher: nn.Module, adapter: ModelAdapter, batch: Batch, loss_cfg: DistillLossConfig
) -> torch.Tensor:
    """The training objective on one batch (gradients flow into ``student`` when enabled)."""
    use_hidden = loss_cfg.hidden_weight > 0
    with torch.no_grad():
        t_out, t_hidden = (
            adapter.forward_with_hidden(teacher, batch)
            if use_hidden
            else (adapter.forward(teacher, batch), [])
        )
    s_out, s_hidden = (
        adapter.forward_with_hidden(student, batch) if use_hidden else (adapter.forward(student, batch), [])
    )
    loss = loss_cfg.output_weight * output_loss(loss_cfg.output, s_out, t_out)
    if use_hidden and s_hidden:
        loss = loss + loss_cfg.hidden_weight * squarehead_loss(
            s_hidden, t_hidden, batch.get("attention_mask")
        )
    return loss


@torch.no_grad()
def evaluate_loss(
    student: nn.Module,
    teacher: nn.Module,
    adapter: ModelAdapter,
    batches: Sequence[Batch],
    loss_cfg: DistillLossConfig,
) -> float:
    """Mean distillation loss over held-out ``batches``."""
    return sum(float(distill_loss(student, teacher, adapter, b, loss_cfg)) for b in batches) / len(batches)


@torch.no_grad()
def reapply_masks_(model: nn.Module) -> None:
    for m in model.modules():
        mask = getattr(m, "weight_mask", None)
        if mask is not None:
            m.weight.mul_(mask)


def _mask_grads(model: nn.Module) -> None:
    for m in model.modules():
        mask = getattr(m, "weight_mask", None)
        if mask is not None and m.weight.grad is not None:
            m.weight.grad.mul_(mask)


def _lr_at(step: int, cfg: RecoverConfig) -> float:
    import math

    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    adapter: ModelAdapter,
    batches: Sequence[Batch],
    cfg: RecoverConfig,
    progress: bool = False,
) -> list[float]:
    """Train ``student`` in place against the frozen ``teacher``; returns the loss per step."""
    if not batches:
        raise DataError("distillation needs training data (data.train_samples is 0)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    student.eval()  # no dropout: recovery matches a deterministic teacher
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="distill", unit="step", leave=False)
    data = itertools.cycle(batches)
    for step in range(cfg.steps):
        batch = next(data)
        with torch.enable_grad():
            loss = distill_loss(student, teacher, adapter, batch, cfg.loss)
        if not torch.isfinite(loss):
            raise DataError(f"distillation loss became {loss.item()} at step {step}; lower the lr")
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _mask_grads(student)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        reapply_masks_(student)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    if bar is not None:
        bar.close()
    for p in student.parameters():
        p.grad = None
    return losses
