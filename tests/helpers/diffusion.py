"""Tiny class-conditional UNet2DModel teachers and pass drivers for the diffusion tests (fixtures: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from compressor.adapters.base import DataSplits  # noqa: E402
from compressor.adapters.diffusion.adapter import DiffusersAdapter  # noqa: E402
from compressor.adapters.diffusion.builders import from_class_unet  # noqa: E402
from compressor.adapters.diffusion.model import DiffusionModel, SamplingSpec  # noqa: E402
from compressor.pipeline import PassContext  # noqa: E402
from compressor.targets import TARGETS  # noqa: E402


def tiny_teacher(steps: int = 4, guidance_scale: float = 2.0, seed: int = 0) -> DiffusionModel:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=11,
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    spec = SamplingSpec(sampler="ddim", steps=steps, guidance="cfg", guidance_scale=guidance_scale)
    return from_class_unet(unet, dict(sched.config), spec).eval()


def make_ctx(model: DiffusionModel, adapter: DiffusersAdapter, data: DataSplits) -> PassContext:
    import copy

    return PassContext(target=TARGETS["cpu"], adapter=adapter, teacher=copy.deepcopy(model), data=data)


def nfe_of(model: DiffusionModel, n: int = 4) -> float:
    return model.sample(torch.arange(n) % 10, torch.Generator().manual_seed(0))[1]


def run_pass(p, model, adapter, data):  # type: ignore[no-untyped-def]
    """requires -> run -> ensures, as the pipeline does; returns (student, ctx)."""
    ctx = make_ctx(model, adapter, data)
    p.requires(model, ctx)
    out = p.run(model, ctx) or model
    p.ensures(out, ctx)
    return out, ctx
