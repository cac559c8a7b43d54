"""lora_rank > 0: the distillation passes train LoRA adapters and merge them back."""

from __future__ import annotations

import pytest
import torch

from compressor.config import from_dict
from tests.helpers.diffusion import run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


@pytest.mark.parametrize("which", ["guidance_distill", "consistency_distill"])
def test_lora_option_trains_adapters_and_merges_them(teacher, adapter, data, which: str) -> None:
    pytest.importorskip("peft")
    from compressor.passes import PASSES

    cls = PASSES[which]
    cfg = from_dict(cls.Config, {"train_steps": 3, "lora_rank": 2, "lr": 1e-2}, "p")
    student, _ = run_pass(cls(cfg), teacher, adapter, data)
    assert not any("lora" in n for n, _ in student.named_parameters())  # merged back: a plain UNet2DModel
    conv = dict(student.unet.named_modules())["down_blocks.0.resnets.0.conv1"]
    assert type(conv) is torch.nn.Conv2d
    before = dict(teacher.unet.named_parameters())["down_blocks.0.resnets.0.conv1.weight"]
    assert not torch.equal(conv.weight, before)  # the merged low-rank update changed the weight
    delta = (conv.weight - before).flatten(1)
    assert torch.linalg.matrix_rank(delta).item() <= 2
