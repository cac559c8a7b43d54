"""Worker for tests/compressor/distill/test_distill_fsdp.py, launched under torchrun (2 CPU ranks, gloo).

    python -m torch.distributed.run --nproc_per_node 2 --standalone fsdp_distill_worker.py \
        MODEL_DIR BATCHES.pt OUT_DIR [KILL_AFTER_STEP]

Each rank builds the same 2:4-masked tiny Llama student, calls ``distill_`` with ``parallel:
fsdp`` exactly as a single process would, and saves its final weights, loss curve and peak
memory and the steps this process ran to ``OUT_DIR/rank{R}.pt``. With KILL_AFTER_STEP every rank exits hard right after the
checkpoint of that step is written (a killed job).
"""

from __future__ import annotations

import copy
import os
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.distill.config import DistillLossConfig, RecoverConfig

CONFIG = RecoverConfig(
    steps=6, lr=1e-3, warmup_steps=1, checkpoint_every=3, parallel="fsdp", loss=DistillLossConfig(output="kl")
)


def build_student_and_teacher(model_dir: str) -> tuple[CausalLMAdapter, nn.Module, nn.Module]:
    """The teacher is the tiny Llama; the student its copy with 2:4 masks on every decoder layer."""
    from compressor.passes.sparsity.sparsify import apply_mask_, mask_24_by_magnitude

    adapter = CausalLMAdapter()
    teacher = adapter.load(model_dir)
    student = copy.deepcopy(teacher)
    for name, m in student.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("model.layers."):
            apply_mask_(m, mask_24_by_magnitude(m.weight))
    return adapter, student, teacher


def main(model_dir: str, batches_file: str, out_dir: str, kill_after: str = "0") -> None:
    import torch.distributed as dist

    from compressor.distill import loop

    if int(kill_after):
        save = loop._save

        def save_then_die(run, ckpt, done, losses):  # type: ignore[no-untyped-def]
            save(run, ckpt, done, losses)
            if done == int(kill_after):
                dist.barrier()  # every rank's shards and rank 0's file are written: now the kill
                os._exit(3)

        loop._save = save_then_die  # type: ignore[assignment]
    ran = []
    step = loop._step

    def counted(run, index):  # type: ignore[no-untyped-def]
        ran.append(index)
        return step(run, index)

    loop._step = counted  # type: ignore[assignment]
    torch.manual_seed(0)
    adapter, student, teacher = build_student_and_teacher(model_dir)
    batches = torch.load(batches_file, weights_only=True)
    losses = loop.distill_(student, teacher, adapter, batches, CONFIG, work_dir=Path(out_dir) / "work")
    rank = dist.get_rank()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(
        {
            "losses": losses,
            "state": student.state_dict(),
            "world": dist.get_world_size(),
            "peak_mb": peak_mb,
            "steps_run": ran,
        },  # fmt: skip
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
