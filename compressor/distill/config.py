"""The distillation configs: how long and how fast recovery trains (``RecoverConfig``) and
what the student matches (``DistillLossConfig``).

Kept apart from the loop so that every lossy pass can declare ``recover:`` (and the
checkpoint can fingerprint a run) without importing the training machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.config import option
from compressor.errors import RecipeError


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
    parallel: Literal["ddp", "fsdp"] = option(
        "ddp",
        help="under torchrun with more than one process: ddp = the whole student on every rank "
        "(DistributedDataParallel); fsdp = the student and the teacher sharded over the ranks (FSDP2 "
        "fully_shard per layer; bf16 compute on CUDA), checkpoints sharded (torch.distributed.checkpoint)",
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
