"""The distillation objective: an output loss plus the SquareHead per-layer loss.

- an output loss on the adapter's output (cosine or MSE on sentence embeddings, KL on logits);
- a SquareHead-style per-layer loss (Kurtic et al., 2023, "Sparse Fine-tuning for
  Inference Acceleration of Large Language Models"): for each layer,
  ``||h_s - h_t||² / ||h_t||²`` over real tokens, so every layer's scale counts alike.
  When depth was pruned, student layer ``i`` of ``Ls`` matches teacher layer
  ``round((i + 1) · Lt / Ls) - 1`` (or the layer ``prune`` recorded it was cut from).

The ``*_terms`` functions return sums and counts, so ranks under torchrun can share one
global mean (``compressor.distill.distributed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter
from compressor.distill.config import DistillLossConfig
from compressor.distill.teacher import TeacherOutputs, run_teacher

# A model attribute (not saved with the model): for each of its layers, the index of the
# layer of the original model it was cut from. ``prune`` sets it when it drops layers.
ORIGIN_LAYERS_ATTR = "compressor_origin_layers"


def layer_map(student_layers: int, teacher_layers: int, origin: Sequence[int] | None = None) -> list[int]:
    """Teacher layer index matched by each student layer.

    With ``origin`` (the teacher layer each student layer was cut from, as ``prune`` records
    it) each layer matches its own origin, so a dropped layer's work goes to the kept layer
    after it; without it (or when it does not fit these depths) the depths are spread evenly
    (identity when they agree)."""
    if origin is not None and len(origin) == student_layers and all(0 <= j < teacher_layers for j in origin):
        return [int(j) for j in origin]
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def origin_layers(model: nn.Module) -> list[int] | None:
    """The origin layer indices ``prune`` recorded on ``model`` (None if no layer was dropped)."""
    origin = getattr(model, ORIGIN_LAYERS_ATTR, None)
    return list(origin) if origin is not None else None


def squarehead_terms(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None,
    origin: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per student layer, ``||h_s - h_t||²`` and ``||h_t||²`` summed over real tokens
    (teacher layers matched by ``layer_map``)."""
    nums, dens = [], []
    for s, j in zip(student, layer_map(len(student), len(teacher), origin)):
        t = teacher[j]
        m = token_mask[..., None].to(s.dtype) if token_mask is not None else torch.ones_like(s[..., :1])
        nums.append(((s - t) ** 2 * m).sum())
        dens.append((t**2 * m).sum())
    return nums, dens


def squarehead_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None,
    origin: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||² / ||h_t||² on real tokens ([B, T, D] each)."""
    nums, dens = squarehead_terms(student, teacher, token_mask, origin)
    return torch.stack([n / d.clamp(min=1e-12) for n, d in zip(nums, dens)]).mean()


def output_loss_terms(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum, count) of the output loss, so ranks can share one global mean.

    Per row of the last dimension for ``cosine`` and ``kl``, per element for ``mse``.
    When the output is per token ([B, T, ·], e.g. LM logits) and ``token_mask`` [B, T]
    is given, padded tokens are left out.
    """
    if token_mask is not None and student.dim() == 3 and token_mask.shape == student.shape[:2]:
        keep = token_mask.bool()
        student, teacher = student[keep], teacher[keep]  # [kept tokens, ·]
    if kind == "mse":
        sq = (student - teacher) ** 2
        return sq.sum(), sq.numel()
    if kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    else:  # kl: KL(teacher || student) at temperature T, times T² so gradients keep their scale
        t = temperature
        log_s = F.log_softmax(student.float() / t, dim=-1)
        log_t = F.log_softmax(teacher.float() / t, dim=-1)
        per_row = (log_t.exp() * (log_t - log_s)).sum(-1) * (t * t)
    return per_row.sum(), per_row.numel()


def output_loss(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    total, count = output_loss_terms(kind, student, teacher, temperature, token_mask)
    return total / max(count, 1)


def distill_loss(
    student: nn.Module,
    teacher: nn.Module,
    adapter: ModelAdapter,
    batch: Batch,
    loss_cfg: DistillLossConfig,
    teacher_outputs: TeacherOutputs | None = None,
) -> torch.Tensor:
    """The training objective on one batch (gradients flow into ``student`` when enabled);
    ``teacher_outputs``: the teacher's outputs on ``batch`` when already known."""
    use_hidden = loss_cfg.hidden_weight > 0
    if teacher_outputs is None:
        teacher_outputs = run_teacher(teacher, adapter, batch, use_hidden)
    t_out, t_hidden = teacher_outputs
    s_out, s_hidden = (
        adapter.forward_with_hidden(student, batch) if use_hidden else (adapter.forward(student, batch), [])
    )
    loss = loss_cfg.output_weight * output_loss(
        loss_cfg.output, s_out, t_out, loss_cfg.temperature, batch.get("attention_mask")
    )
    if use_hidden and s_hidden:
        loss = loss + loss_cfg.hidden_weight * squarehead_loss(
            s_hidden, t_hidden, batch.get("attention_mask"), origin_layers(student)
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
