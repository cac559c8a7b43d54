"""Distillation with the student sharded by FSDP2 (``parallel: fsdp`` under ``torchrun``).

Each rank holds a 1/N shard of the student's parameters, gradients and AdamW state
(``torch.distributed.fsdp.fully_shard``: every block of a ``ModuleList``, the transformer
layers, is one unit, then the root); the frozen teacher is sharded the same way. Both are
deep copies of the models the pass hands in: those stay whole on every rank (the pipeline
around the distillation holds them anyway), and when training ends the student's full
state dict is gathered back into it (``gather_into_``). The loss is the DDP path's
(``compressor.distill.distributed.sharded_loss``: every mean's denominator all-reduced
first) and FSDP2 averages the gradients over ranks as DDP does, so N ranks follow the
single-process trajectory on the same global batches.

Mixed precision follows the device: on CUDA the units compute in bf16 with fp32 gradient
reduction (``MixedPrecisionPolicy``), on the CPU in fp32.

Checkpoints are sharded: ``torch.distributed.checkpoint`` writes each rank's shards of the
student and the optimizer into ``distill-<key>.dcp/step-<N>/``, then rank 0 writes the
run's ``distill-<key>.pt`` (fingerprint, step, losses, RNG, no tensors of the model) naming
that folder, then the older step folders are removed: a kill at any point leaves a
``.pt`` that names a complete folder.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn


def mixed_precision(device: torch.device) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def sharded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` fully sharded over the default process group."""
    from torch.distributed.fsdp import fully_shard

    out = copy.deepcopy(model)
    device = next(out.parameters()).device
    policy = mixed_precision(device)
    for m in list(out.modules()):
        if isinstance(m, nn.ModuleList):
            for block in m:
                if any(True for _ in block.parameters()):
                    fully_shard(block, mp_policy=policy)
    fully_shard(out, mp_policy=policy)
    return out


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``full`` where ``like`` is an FSDP2 shard (a DTensor split on dim 0:
    ``torch.chunk`` order), else ``full`` itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return full
    local = like.to_local()
    rank, world = like.device_mesh.get_local_rank(), like.device_mesh.size()
    chunks = full.chunk(world, dim=0)
    part = chunks[rank] if rank < len(chunks) else full[:0]
    if part.shape != local.shape:
        raise RuntimeError(
            f"FSDP shard of shape {tuple(local.shape)} does not match rows {tuple(part.shape)}"
        )
    return part.to(local.device)


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def gather_into_(sharded: nn.Module, model: nn.Module) -> None:
    """Load the sharded copy's full state dict (gathered on every rank) into ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict(full, strict=True)


def dcp_folder(pt_path: Path, step: int) -> Path:
    return pt_path.with_suffix(".dcp") / f"step-{step}"


def save_sharded(sharded: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the student and the optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(sharded), "optim": get_optimizer_state_dict(sharded, opt)}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(sharded: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model, optim = get_model_state_dict(sharded), get_optimizer_state_dict(sharded, opt)
    dcp.load({"model": model, "optim": optim}, checkpoint_id=str(folder))  # in place, shard by shard
    set_model_state_dict(sharded, model)
    set_optimizer_state_dict(sharded, opt, optim)


def remove_older(pt_path: Path, keep: Path) -> None:
    """Remove the step folders beside ``keep`` (rank 0, after the ``.pt`` names ``keep``)."""
    root = pt_path.with_suffix(".dcp")
    for old in root.glob("step-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
