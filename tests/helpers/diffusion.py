"""Tiny class-conditional UNet2DModel teachers and pass drivers for the diffusion tests (fixtures: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from compressor.adapters.base import DataSplits  # noqa: E402
from compressor.adapters.diffusion.adapter import DiffusersAdapter  # noqa: E402
from compressor.adapters.diffusion.builders import from_class_unet  # noqa: E402
from compressor.adapters.diffusion.model import DiffusionModel, SamplingSpec  # noqa: E402
from compressor.pipeline import Pass, PassContext, PassOutput  # noqa: E402
from compressor.planning import PlanState  # noqa: E402
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


def plan_state(model: Any, adapter: Any) -> PlanState:
    """The plan before any pass, for ``model`` deployed on the CPU target."""
    return PlanState.from_model(model, TARGETS["cpu"], adapter)


def run_pass(p: Pass, model: DiffusionModel, adapter: Any, data: Any) -> tuple[DiffusionModel, PassOutput]:
    """plan -> requires -> run -> ensures, as a compile does; returns (the model it leaves, its
    output). Also checks that the sampling the pass planned is the sampling of the model its
    run leaves, so every test that runs a pass checks its ``plan`` too."""
    planned = p.plan(plan_state(model, adapter))
    ctx = make_ctx(model, adapter, data)
    p.requires(model, ctx)
    out = p.run(model, ctx)
    assert isinstance(out, PassOutput)
    p.ensures(out, ctx)
    assert planned.diffusion == plan_state(out.model, adapter).diffusion, (planned.diffusion, out.model)
    return cast(DiffusionModel, out.model), out


def save_tiny_teacher(folder: Path, num_class_embeds: int = 11) -> Path:
    """The tiny class-conditional teacher written as a plain diffusers pipeline folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    teacher = tiny_teacher()
    unet = teacher.unet
    emb = teacher.conditioner.label_embedding
    if num_class_embeds != emb.num_embeddings:
        emb = torch.nn.Embedding(num_class_embeds, emb.embedding_dim)
    unet.class_embedding = emb
    unet.register_to_config(class_embed_type=None, num_class_embeds=num_class_embeds)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(teacher.train_config)).save_pretrained(folder)
    (folder / "sampling.json").write_text('{"steps": 4, "guidance_scale": 2.0}')
    return folder
