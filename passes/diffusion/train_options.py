"""The training options the three distillation passes share, as one option group.

``guidance_distill``, ``progressive_distill`` and ``consistency_distill`` each compose
this group into their config (a subclass may restate a field to change its default or
help, e.g. ``train_steps`` per halving round) and call ``check_train`` from their
``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import option
from compressor.errors import RecipeError


@dataclass(frozen=True)
class TrainOptions:
    """Optimizer steps, batch, learning rate and LoRA rank of a distillation pass."""

    train_steps: int = option(400, help="optimizer steps")
    batch_size: int = option(64, help="real images per step", le=65_536)
    lr: float = option(2e-4, help="AdamW learning rate", gt=0.0, le=1.0)
    lora_rank: int = option(
        0,
        help="0 = fine-tune the whole denoiser; r > 0 = train rank-r LoRA adapters (peft), merged after",
        le=4096,
    )

    def check_train(self, path: str) -> None:
        """Refuse training options no run can use (``path`` names the recipe entry)."""
        if self.lora_rank < 0:
            raise RecipeError(f"{path}.lora_rank: must be 0 (full fine-tuning) or positive")
        for name in ("train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{path}.{name}: must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RecipeError(f"{path}.lr: must be positive, got {self.lr}")
