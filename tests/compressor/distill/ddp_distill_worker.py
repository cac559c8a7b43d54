"""Worker for tests/compressor/distill/test_distill_ddp.py, launched under torchrun (2 CPU ranks, gloo).

    python -m torch.distributed.run --nproc_per_node 2 --standalone ddp_distill_worker.py \
        MODEL_DIR BATCHES.pt OUT_DIR

Each rank builds the same 2:4-masked tiny BERT student, calls ``distill_`` exactly as a
single process would (it initialises torch.distributed from torchrun's environment),
and saves its final weights and loss curve to ``OUT_DIR/rank{R}.pt``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

from compressor.adapters.hf_encoder import HFEncoderAdapter
from compressor.distill.config import RecoverConfig
from compressor.distill.loop import distill_

CONFIG = RecoverConfig(steps=6, lr=1e-3, warmup_steps=1, checkpoint_every=3)


def build_student_and_teacher(model_dir: str) -> tuple[HFEncoderAdapter, nn.Module, nn.Module]:
    """The teacher is the dense model; the student its copy with 2:4 masks on the encoder.

    The attention key biases are frozen: softmax ignores a shift shared by all keys, so
    their true gradient is zero and what autograd returns is rounding noise, which Adam
    scales up to steps of ±lr in a direction no two summation orders agree on. Every
    other parameter trains."""
    from compressor.passes.sparsity.sparsify import apply_mask_, mask_24_by_magnitude

    adapter = HFEncoderAdapter()
    teacher = adapter.load(model_dir)
    student = copy.deepcopy(teacher)
    for name, m in student.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("encoder."):
            apply_mask_(m, mask_24_by_magnitude(m.weight))
        if name.endswith("attention.self.key"):
            m.bias.requires_grad_(False)
    return adapter, student, teacher


def main(model_dir: str, batches_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    adapter, student, teacher = build_student_and_teacher(model_dir)
    batches = torch.load(batches_file, weights_only=True)
    losses = distill_(student, teacher, adapter, batches, CONFIG, work_dir=Path(out_dir) / "work")
    rank = dist.get_rank()
    torch.save(
        {"losses": losses, "state": student.state_dict(), "world": dist.get_world_size()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
