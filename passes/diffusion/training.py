"""The training loop the step-reduction passes share: data, teacher outputs, the student, Adam.

Each distillation pass (``guidance_distill``, ``progressive_distill``,
``consistency_distill``) builds a loss from these pieces and hands it to ``fit``; the
math of noising and DDIM steps is the model's ``NoiseSchedule``
(``compressor.adapters.diffusion.schedule``), so the same loop trains epsilon-prediction
(DDPM) and flow-matching (velocity) denoisers alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.errors import PassError
from compressor.passes.diffusion.lora import attach_lora_, merge_lora_

if TYPE_CHECKING:
    from compressor.adapters.base import DataSplits
    from compressor.adapters.diffusion.model import DiffusionModel
    from compressor.progress import Progress


def minibatches(data: DataSplits, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random minibatches of (images, labels) from the real training split."""
    images = torch.cat([b["images"] for b in data.train])
    labels = torch.cat([b["labels"] for b in data.train])
    if images.shape[0] == 0:
        raise PassError("step reduction needs real training images (data.train is empty)")
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        yield images[idx], labels[idx]


def guided_at(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's guided output at integer training timesteps t."""
    return model.guided(x, model.schedule.model_t(t), labels)[0]


@torch.no_grad()
def teacher_out(
    teacher: DiffusionModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return guided_at(teacher, x, t, labels)


def make_student(model: DiffusionModel, **spec_changes: Any) -> DiffusionModel:
    """A trainable copy; a classifier-free-guided model becomes a guidance-baked one (1 NFE).
    (Its planned sampling: ``diffusion_plan.student_plan``.)"""
    student = copy.deepcopy(model)
    if model.spec.guidance == "cfg":
        spec_changes.setdefault("guidance", "none")
    spec_changes.setdefault("adaptive_guidance_threshold", None)
    return student.with_spec(**spec_changes).train().requires_grad_(True)


def fit(
    student: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    what: str,
    on_step: Callable[[int], None] | None = None,
    lora_rank: int = 0,
    bar: Progress | None = None,
) -> list[float]:
    """Adam on ``loss_fn(step)``; returns the loss curve, raises on a non-finite loss.

    ``bar`` (from ``PassContext.progress_bar``) advances one tick per optimizer step.

    With ``lora_rank > 0`` only LoRA adapters on ``student.unet`` (and any new conditioner
    layers) train, and are merged back afterwards so the student is a plain denoiser.
    """
    if lora_rank > 0:
        attach_lora_(student.unet, lora_rank)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise PassError(f"{what}: loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss={losses[-1]:.4g}")
    if lora_rank > 0:
        merge_lora_(student)
        student.requires_grad_(True)
    return losses


def loss_summary(losses: list[float]) -> dict[str, float]:
    """The mean loss over the first and the last tenth of a run, for the pass's details."""
    k = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
