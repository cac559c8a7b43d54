"""Distillation under ``torchrun``: the process group, each rank's share of a global batch,
the DistributedDataParallel wrapper and the loss that sums over ranks to the global one.

Each global batch is split across the ranks and every mean's denominator is all-reduced
before dividing, so N ranks follow the same trajectory as one process on the same batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from compressor.adapters.base import Batch, ModelAdapter
from compressor.distill.config import DistillLossConfig
from compressor.distill.losses import output_loss_terms, squarehead_terms
from compressor.distill.teacher import TeacherOutputs, run_teacher
from compressor.errors import DataError

log = logging.getLogger(__name__)


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


class StudentForward(nn.Module):
    """The student as the adapter runs it: what DistributedDataParallel wraps (so the
    adapter keeps calling the plain student and DDP still sees every forward); under FSDP
    the sharded student itself, unwrapped (``compressor.distill.fsdp``)."""

    def __init__(self, student: nn.Module, adapter: ModelAdapter, use_hidden: bool) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter
        self.use_hidden = use_hidden

    def forward(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.use_hidden:
            return self.adapter.forward_with_hidden(self.student, batch)
        return self.adapter.forward(self.student, batch), []


def sharded_loss(
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
        teacher_outputs = run_teacher(teacher, adapter, shard, use_hidden)
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


def wrap_ddp(student: nn.Module, adapter: ModelAdapter, use_hidden: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device = next(student.parameters()).device
    return DistributedDataParallel(
        StudentForward(student, adapter, use_hidden),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,  # e.g. BERT's pooler: not on the distillation path
    )
