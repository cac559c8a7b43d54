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

Long runs survive interruption: with ``checkpoint_every: N`` the engine writes a
checkpoint (``compressor.distill_checkpoint``) into the work dir every N steps and
resumes from it on the next run, without losing or repeating a step. Under
``torchrun`` the same call trains data-parallel (``torch.nn.parallel.
DistributedDataParallel``): each global batch is split across the ranks and the loss
is normalised over the whole global batch, so N ranks follow the same trajectory as
one process on the same batches.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter
from compressor.config import option
from compressor.distill_checkpoint import DistillCheckpoint
from compressor.errors import DataError, RecipeError
from compressor.progress import ProgressSetting, open_progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillLossConfig:
    output: Literal["cosine", "mse", "kl"] = option(
        "cosine",
        help="loss on the model output: cosine / mse (embeddings), kl = KL(teacher || student) of the "
        "softmax of logits (classifiers, language models; per kept token)",
    )
    temperature: float = option(
        1.0, help="kl: softmax temperature T of both distributions; the loss is scaled by T² (Hinton et al.)"
    )
    output_weight: float = option(1.0, help="weight of the output loss")
    hidden_weight: float = option(
        1.0, help="weight of the per-layer normalised hidden-state loss (SquareHead)"
    )

    def validate(self, path: str) -> None:
        if self.output_weight < 0 or self.hidden_weight < 0 or self.output_weight + self.hidden_weight == 0:
            raise RecipeError(f"{path}: loss weights must be non-negative and not both zero")
        if not self.temperature > 0:
            raise RecipeError(f"{path}.temperature: {self.temperature} must be positive")


@dataclass(frozen=True)
class RecoverConfig:
    steps: int = option(100, help="optimizer steps")
    lr: float = option(1e-5, help="peak learning rate (AdamW), linear warm-up then cosine decay")
    warmup_steps: int = option(10, help="linear warm-up steps")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    grad_clip: float = option(1.0, help="clip the gradient norm to this (0 = off)")
    loss: DistillLossConfig = option(DistillLossConfig(), help="what the student matches")
    checkpoint_every: int = option(
        0,
        help="write a resumable checkpoint to the work dir every N steps and resume from it "
        "on the next run (0 = off; `compressor compile --work-dir DIR` keeps it across runs)",
    )
    teacher_cache_mb: int = option(
        4096,
        help="keep the frozen teacher's outputs (and hidden states) of each training batch, up to this "
        "many MiB on the teacher's device, so later epochs skip the teacher's forward; batches past "
        "the budget are recomputed each step (0 = off; the losses are the same either way)",
    )

    def validate(self, path: str) -> None:
        if self.steps < 1:
            raise RecipeError(f"{path}.steps: must be at least 1")
        if not 0 < self.lr < 1:
            raise RecipeError(f"{path}.lr: {self.lr} is not in (0, 1)")
        if self.warmup_steps > self.steps:
            raise RecipeError(f"{path}.warmup_steps: {self.warmup_steps} is more than steps ({self.steps})")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise RecipeError(f"{path}: warmup_steps, grad_clip and weight_decay must not be negative")
        if self.checkpoint_every < 0:
            raise RecipeError(f"{path}.checkpoint_every: {self.checkpoint_every} is negative (0 = off)")
        if self.teacher_cache_mb < 0:
            raise RecipeError(f"{path}.teacher_cache_mb: {self.teacher_cache_mb} is negative (0 = off)")


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


def _teacher_outputs(
    teacher: nn.Module, adapter: ModelAdapter, batch: Batch, use_hidden: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        if use_hidden:
            return adapter.forward_with_hidden(teacher, batch)
        return adapter.forward(teacher, batch), []


TeacherOutputs = tuple[torch.Tensor, list[torch.Tensor]]


class TeacherCache:
    """The frozen teacher's outputs per training batch, kept while they fit ``budget_bytes``.

    Recovery cycles over a few hundred batches for many epochs, and the teacher (in eval mode,
    no dropout) gives the same outputs for the same batch every time, so its forward is needed
    once per batch, not once per step (measured on MiniLM: 22 % of a step for a full-size
    student, 33 % for a 4-layer one). Batches that do not fit are recomputed every time they come round.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.forwards = 0  # teacher forwards run (a measure for tests and logs)
        self._store: dict[int, TeacherOutputs] = {}

    def get(
        self, key: int, teacher: nn.Module, adapter: ModelAdapter, batch: Batch, use_hidden: bool
    ) -> TeacherOutputs:
        hit = self._store.get(key)
        if hit is not None:
            return hit
        out = _teacher_outputs(teacher, adapter, batch, use_hidden)
        self.forwards += 1
        size = sum(t.numel() * t.element_size() for t in (out[0], *out[1]))
        if self.used_bytes + size <= self.budget_bytes:
            self._store[key] = out
            self.used_bytes += size
        return out


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
        teacher_outputs = _teacher_outputs(teacher, adapter, batch, use_hidden)
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


def masked_weights(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) of every layer that carries a sparsity mask (``weight_mask``)."""
    for m in model.modules():
        mask, weight = getattr(m, "weight_mask", None), getattr(m, "weight", None)
        if isinstance(mask, torch.Tensor) and isinstance(weight, torch.Tensor):
            yield weight, mask


@torch.no_grad()
def reapply_masks_(model: nn.Module) -> None:
    for weight, mask in masked_weights(model):
        weight.mul_(mask)


def _mask_grads(model: nn.Module) -> None:
    for weight, mask in masked_weights(model):
        if weight.grad is not None:
            weight.grad.mul_(mask)


def _lr_at(step: int, cfg: RecoverConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------
# Data parallelism (torchrun)


def distributed_world(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size). Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is
    initialised from the environment when nobody has yet: NCCL for a CUDA student, gloo
    otherwise. Outside torchrun: (0, 1)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        log.info("torch.distributed initialised from the environment (%s)", dist.get_backend())
    return dist.get_rank(), dist.get_world_size()


def shard_batch(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s examples of a global batch: every ``world``-th, starting at ``rank``
    (DistributedSampler order, without its padding, so no example counts twice)."""
    sizes = {v.shape[0] for v in batch.values() if v.dim() > 0}
    n = max(sizes) if sizes else 0
    if n < world:
        raise DataError(
            f"distillation under torchrun: a batch of {n} examples cannot be split across {world} "
            f"ranks; raise data.batch_size to at least {world} or launch fewer processes"
        )
    idx = torch.arange(rank, n, world)
    return {
        k: v.index_select(0, idx.to(v.device)) if v.dim() > 0 and v.shape[0] == n else v
        for k, v in batch.items()
    }


class _StudentForward(nn.Module):
    """The student as the adapter runs it: what DistributedDataParallel wraps (so the
    adapter keeps calling the plain student and DDP still sees every forward)."""

    def __init__(self, student: nn.Module, adapter: ModelAdapter, use_hidden: bool) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.use_hidden = use_hidden

    def forward(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.use_hidden:
            return self.adapter.forward_with_hidden(self.student, batch)
        return self.adapter.forward(self.student, batch), []


def _sharded_loss(
    ddp_student: nn.Module,
    teacher: nn.Module,
    adapter: ModelAdapter,
    shard: Batch,
    loss_cfg: DistillLossConfig,
    origin: Sequence[int] | None,
    teacher_outputs: TeacherOutputs | None = None,
) -> torch.Tensor:
    """This rank's share of the global-batch loss: summed over ranks it is ``distill_loss``
    on the whole global batch (every mean's denominator is all-reduced first); ``origin``
    as in ``layer_map``; ``teacher_outputs``: the teacher's on ``shard`` when already known."""
    import torch.distributed as dist

    use_hidden = loss_cfg.hidden_weight > 0
    if teacher_outputs is None:
        teacher_outputs = _teacher_outputs(teacher, adapter, shard, use_hidden)
    t_out, t_hidden = teacher_outputs
    s_out, s_hidden = ddp_student(shard)
    out_sum, out_count = output_loss_terms(
        loss_cfg.output, s_out, t_out, loss_cfg.temperature, shard.get("attention_mask")
    )
    nums: list[torch.Tensor] = []
    dens: list[torch.Tensor] = []
    if use_hidden and s_hidden:
        nums, dens = squarehead_terms(s_hidden, t_hidden, shard.get("attention_mask"), origin)
    counts = [torch.tensor(float(out_count), device=out_sum.device), *[d.detach() for d in dens]]
    totals = torch.stack([c.double() for c in counts])  # on the student's device (NCCL needs it)
    dist.all_reduce(totals)  # [1 + layers]: global example count, global ||h_t||² per layer
    totals = totals.to(out_sum.dtype)
    loss = loss_cfg.output_weight * out_sum / totals[0]
    if nums:
        per_layer = [n / d.clamp(min=1e-12) for n, d in zip(nums, totals[1:])]
        loss = loss + loss_cfg.hidden_weight * torch.stack(per_layer).mean()
    return loss


def _wrap_ddp(student: nn.Module, adapter: ModelAdapter, use_hidden: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device = next(student.parameters()).device
    return DistributedDataParallel(
        _StudentForward(student, adapter, use_hidden),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,  # e.g. BERT's pooler: not on the distillation path
    )


# ---------------------------------------------------------------------------------------
# The training loop


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    adapter: ModelAdapter,
    batches: Sequence[Batch],
    cfg: RecoverConfig,
    progress: ProgressSetting = False,
    work_dir: Path | str | None = None,
) -> list[float]:
    """Train ``student`` in place against the frozen ``teacher``; returns the loss per step.

    ``batches`` are global batches, taken in order (cycling). With
    ``cfg.checkpoint_every`` > 0 and a ``work_dir``, a checkpoint of this run is written
    there every N steps (and after the last) and a matching one found there is resumed.
    Under torchrun with more than one process, the student trains under
    DistributedDataParallel, each rank on its share of every global batch; the returned
    losses are the global-batch losses (all-reduced), identical on every rank.
    """
    if not batches:
        raise DataError("distillation needs training data (data.train_samples is 0)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    student.eval()  # no dropout: recovery matches a deterministic teacher
    device = params[0].device if params else torch.device("cpu")
    rank, world = distributed_world(device)

    ckpt: DistillCheckpoint | None = None
    if cfg.checkpoint_every > 0:
        if work_dir is None:
            log.warning(
                "distill: checkpoint_every is %d but there is no work dir: no checkpoints",
                cfg.checkpoint_every,
            )
        else:
            ckpt = DistillCheckpoint.for_run(Path(work_dir), cfg, student, batches)
    losses: list[float] = []
    start = 0
    if ckpt is not None:
        state = ckpt.load()
        if state is not None:
            start, losses = ckpt.restore_(state, student, opt)
            log.info("distill: resumed from %s at step %d of %d", ckpt.path, start, cfg.steps)

    use_hidden = cfg.loss.hidden_weight > 0
    ddp = _wrap_ddp(student, adapter, use_hidden) if world > 1 and start < cfg.steps else None
    cache = TeacherCache(cfg.teacher_cache_mb * 2**20)
    bar = open_progress(progress if rank == 0 else False, "distill", cfg.steps, "step", initial=start)
    for step in range(start, cfg.steps):
        index = step % len(batches)
        batch = batches[index] if ddp is None else shard_batch(batches[index], rank, world)
        t_outputs = cache.get(index, teacher, adapter, batch, use_hidden)
        with torch.enable_grad():
            if ddp is None:
                loss = distill_loss(student, teacher, adapter, batch, cfg.loss, t_outputs)
                backward, logged = loss, loss.detach()
            else:
                import torch.distributed as dist

                local = _sharded_loss(
                    ddp, teacher, adapter, batch, cfg.loss, origin_layers(student), t_outputs
                )
                backward = local * world  # DDP averages gradients over ranks; the loss is their sum
                logged = local.detach().clone()
                dist.all_reduce(logged)
        if not torch.isfinite(logged):
            raise DataError(f"distillation loss became {logged.item()} at step {step}; lower the lr")
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        backward.backward()
        _mask_grads(student)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        reapply_masks_(student)
        losses.append(float(logged))
        done = step + 1
        if ckpt is not None and rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            ckpt.save(student, opt, done, losses)
        bar.update(1)
        bar.set_postfix_str(f"loss={losses[-1]:.4g}")
    bar.close()
    log.info(
        "distill: %d teacher forwards for %d steps (%.0f MiB of teacher outputs cached)",
        cache.forwards,
        cfg.steps - start,
        cache.used_bytes / 2**20,
    )
    for p in student.parameters():
        p.grad = None
    return losses
