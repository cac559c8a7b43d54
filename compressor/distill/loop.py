"""The distillation engine: recovery for every lossy pass.

The student is trained to match the frozen teacher on real data with the objective of
``compressor.distill.losses`` (an output loss plus the SquareHead per-layer loss).

What the earlier passes fixed stays fixed: 2:4 masks are re-applied after every
step (and masked gradients zeroed, so optimizer state never revives a pruned
weight); quantizer scales are buffers, never trained, while int8 layers train their
float master weights through a straight-through estimator (quantization-aware
distillation). Dropout is off: the student runs in eval mode with gradients on.

Long runs survive interruption: with ``checkpoint_every: N`` the engine writes a
checkpoint (``compressor.distill.checkpoint``) into the work dir every N steps and
resumes from it on the next run, without losing or repeating a step. Under
``torchrun`` the same call trains data-parallel (``compressor.distill.distributed``):
each global batch is split across the ranks and the loss is normalised over the whole
global batch, so N ranks follow the same trajectory as one process on the same batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter
from compressor.distill.checkpoint import DistillCheckpoint
from compressor.distill.config import RecoverConfig
from compressor.distill.distributed import (
    StudentForward,
    distributed_world,
    shard_batch,
    sharded_loss,
    wrap_ddp,
)
from compressor.distill.fsdp import local, local_part
from compressor.distill.losses import distill_loss, origin_layers
from compressor.distill.teacher import TeacherCache, TeacherOutputs
from compressor.errors import DataError
from compressor.progress import ProgressSetting, open_progress

log = logging.getLogger(__name__)


def masked_weights(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) of every layer that carries a sparsity mask (``weight_mask``)."""
    for m in model.modules():
        mask, weight = getattr(m, "weight_mask", None), getattr(m, "weight", None)
        if isinstance(mask, torch.Tensor) and isinstance(weight, torch.Tensor):
            yield weight, mask


@torch.no_grad()
def reapply_masks_(model: nn.Module) -> None:
    for weight, mask in masked_weights(model):
        local(weight).mul_(local_part(mask, weight))  # an FSDP shard: its rows of the mask


def _mask_grads(model: nn.Module) -> None:
    for weight, mask in masked_weights(model):
        if weight.grad is not None:
            local(weight.grad).mul_(local_part(mask, weight))


def _lr_at(step: int, cfg: RecoverConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Run:
    """One distillation run's moving parts, shared by the steps."""

    student: nn.Module
    teacher: nn.Module
    adapter: ModelAdapter
    batches: Sequence[Batch]
    cfg: RecoverConfig
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    rank: int
    world: int
    ddp: nn.Module | None
    cache: TeacherCache


def _freeze_teacher(teacher: nn.Module) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def _open_checkpoint(
    cfg: RecoverConfig, work_dir: Path | str | None, student: nn.Module, batches: Sequence[Batch]
) -> DistillCheckpoint | None:
    if cfg.checkpoint_every <= 0:
        return None
    if work_dir is None:
        log.warning(
            "distill: checkpoint_every is %d but there is no work dir: no checkpoints", cfg.checkpoint_every
        )
        return None
    return DistillCheckpoint.for_run(Path(work_dir), cfg, student, batches)


def _resume(
    ckpt: DistillCheckpoint | None, cfg: RecoverConfig, student: nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, list[float]]:
    """(first step to run, losses so far): from a matching checkpoint, else (0, [])."""
    if ckpt is None:
        return 0, []
    state = ckpt.load()
    if state is None:
        return 0, []
    start, losses = ckpt.restore_(state, student, opt)
    log.info("distill: resumed from %s at step %d of %d", ckpt.path, start, cfg.steps)
    return start, losses


def _losses(run: _Run, batch: Batch, t_outputs: TeacherOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to back-propagate, the global-batch loss to log) on this rank's ``batch``."""
    if run.ddp is None:
        loss = distill_loss(run.student, run.teacher, run.adapter, batch, run.cfg.loss, t_outputs)
        return loss, loss.detach()
    import torch.distributed as dist

    local = sharded_loss(
        run.ddp, run.teacher, run.adapter, batch, run.cfg.loss, origin_layers(run.student), t_outputs
    )
    logged = local.detach().clone()
    dist.all_reduce(logged)
    return local * run.world, logged  # DDP averages gradients over ranks; the loss is their sum


def _step(run: _Run, step: int) -> float:
    """One optimizer step on global batch ``step % len(batches)``; returns its loss."""
    index = step % len(run.batches)
    batch = run.batches[index] if run.ddp is None else shard_batch(run.batches[index], run.rank, run.world)
    t_outputs = run.cache.get(index, run.teacher, run.adapter, batch, run.cfg.loss.hidden_weight > 0)
    with torch.enable_grad():
        backward, logged = _losses(run, batch, t_outputs)
    if not torch.isfinite(logged):
        raise DataError(f"distillation loss became {logged.item()} at step {step}; lower the lr")
    for g in run.opt.param_groups:
        g["lr"] = _lr_at(step, run.cfg)
    run.opt.zero_grad(set_to_none=True)
    backward.backward()
    _mask_grads(run.student)
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    run.opt.step()
    reapply_masks_(run.student)
    return float(logged)


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
    _freeze_teacher(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    student.eval()  # no dropout: recovery matches a deterministic teacher
    rank, world = distributed_world(params[0].device if params else torch.device("cpu"))
    ckpt = _open_checkpoint(cfg, work_dir, student, batches)
    cache = TeacherCache(cfg.teacher_cache_mb * 2**20)
    use_hidden = cfg.loss.hidden_weight > 0
    if world > 1 and cfg.parallel == "fsdp":
        run, start, losses = _fsdp_run(student, teacher, adapter, batches, cfg, ckpt, rank, world, cache)
    else:
        start, losses = _resume(ckpt, cfg, student, opt)
        ddp = wrap_ddp(student, adapter, use_hidden) if world > 1 and start < cfg.steps else None
        run = _Run(student, teacher, adapter, batches, cfg, params, opt, rank, world, ddp, cache)
    bar = open_progress(progress if rank == 0 else False, "distill", cfg.steps, "step", initial=start)
    for step in range(start, cfg.steps):
        losses.append(_step(run, step))
        done = step + 1
        if ckpt is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save(run, ckpt, done, losses)
        bar.update(1)
        bar.set_postfix_str(f"loss={losses[-1]:.4g}")
    bar.close()
    log.info(
        "distill: %d teacher forwards for %d steps (%.0f MiB of teacher outputs cached)",
        run.cache.forwards,
        cfg.steps - start,
        run.cache.used_bytes / 2**20,
    )
    if run.student is not student:  # the FSDP copy: its full weights back into the pass's student
        from compressor.distill.fsdp import gather_into_

        gather_into_(run.student, student)
    for p in student.parameters():
        p.grad = None
    return losses


def _fsdp_run(
    student: nn.Module, teacher: nn.Module, adapter: ModelAdapter, batches: Sequence[Batch], cfg: RecoverConfig,
    ckpt: DistillCheckpoint | None, rank: int, world: int, cache: TeacherCache,
) -> tuple[_Run, int, list[float]]:  # fmt: skip
    """The FSDP2 run (``compressor.distill.fsdp``): sharded copies of the student and the teacher,
    the optimizer over the student's shards, resumed from a sharded checkpoint when one matches."""
    from compressor.distill.checkpoint import set_rng_state
    from compressor.distill.fsdp import load_sharded, sharded_copy

    sharded, sharded_teacher = sharded_copy(student), sharded_copy(teacher)
    sharded.eval()
    params = [p for p in sharded.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    state = ckpt.load() if ckpt is not None else None
    if ckpt is not None and state is not None:
        load_sharded(sharded, opt, ckpt.shards_of(state))
        set_rng_state(state["rng"])
        start, losses = int(state["step"]), [float(x) for x in state["losses"]]
        log.info("distill: resumed the sharded run from %s at step %d of %d", ckpt.path, start, cfg.steps)
    forward = StudentForward(sharded, adapter, cfg.loss.hidden_weight > 0)
    run = _Run(sharded, sharded_teacher, adapter, batches, cfg, params, opt, rank, world, forward, cache)
    return run, start, losses


def _save(run: _Run, ckpt: DistillCheckpoint, done: int, losses: list[float]) -> None:
    """The checkpoint after step ``done``: rank 0's whole file, or every rank's shards then rank 0's file."""
    if not isinstance(run.ddp, StudentForward):  # one process, or DDP: rank 0 holds it all
        if run.rank == 0:
            ckpt.save(run.student, run.opt, done, losses)
        return
    from compressor.distill.fsdp import dcp_folder, remove_older, save_sharded

    folder = dcp_folder(ckpt.path, done)
    save_sharded(run.student, run.opt, folder)  # a collective: every rank writes its shards
    if run.rank == 0:
        ckpt.save(None, None, done, losses, shards=folder.name)
        remove_older(ckpt.path, folder)
