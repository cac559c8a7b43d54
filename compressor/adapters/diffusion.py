"""The diffusion model the pipeline carries: a diffusers denoiser plus its sampling recipe.

``DiffusionModel`` is an ``nn.Module`` holding the denoiser (a diffusers
``UNet2DModel``), the ``ClassConditioner`` that turns a label (and, after guidance
distillation, a guidance scale) into the UNet's class embedding, the training noise
schedule, and a ``SamplingSpec``: which diffusers scheduler, how many steps, and how
guidance is applied (classifier-free guidance with two evaluations, an embedded
guidance scale with one, or none). Step-reduction passes return a *student*
``DiffusionModel``: a new denoiser and a spec with N steps. Because the student is the
model the pipeline carries, any later pass (quantization, sparsity) that walks the
module tree acts on the student's denoiser.

Covered: class-conditional ``UNet2DModel`` (epsilon prediction) with DDPM-trained
schedules, sampled by DDIM, DPM-Solver++, UniPC or LCM (consistency) schedulers, with
classifier-free guidance. Not covered: ``UNet2DConditionModel`` / text conditioning,
transformer (DiT) denoisers, v-prediction and flow-matching teachers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from compressor.adapters.base import Batch, DataSplits, ExportSpec, ModelAdapter
from compressor.adapters.digits import NULL_LABEL, NUM_CLASSES, DigitsScorer, load_digits_split
from compressor.errors import DataError, PassError

log = logging.getLogger(__name__)

Sampler = Literal["ddim", "dpmsolver++", "unipc", "lcm"]
Guidance = Literal["cfg", "embedded", "none"]


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("diffusion models need diffusers: pip install 'compressor[diffusion]'") from e
    return diffusers


@dataclass(frozen=True)
class SamplingSpec:
    """How the model is sampled: scheduler, step count and guidance."""

    sampler: Sampler = "ddim"
    steps: int = 50
    guidance: Guidance = "cfg"
    guidance_scale: float = 2.0
    adaptive_guidance_threshold: float | None = None  # cosine(eps_c, eps_u) above which uncond is dropped
    adaptive_guidance_warmup: float = 0.3  # fraction of steps always guided (at pure noise eps_c ~ eps_u ~ x)
    original_inference_steps: int = 50  # the LCM skipping-step grid a consistency student was trained on


SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


# clip the predicted clean image to the data range at every step, as DDIM's clip_sample does:
# dynamic thresholding with sample_max_value 1 is exactly that clip (the quantile is floored at 1)
_X0_CLIP = {"thresholding": True, "sample_max_value": 1.0}


def make_scheduler(train_config: dict[str, Any], spec: SamplingSpec) -> Any:
    """A diffusers scheduler for ``spec`` sharing the teacher's noise schedule, set to ``spec.steps``."""
    d = _diffusers()
    # only the noise schedule carries over: sampler options (clipping etc.) are set here, so a
    # student reloaded from its own scheduler config samples identically
    base = {k: v for k, v in train_config.items() if k in SCHEDULE_KEYS}
    if spec.sampler == "ddim":
        sched = d.DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=True)
    elif spec.sampler == "dpmsolver++":
        sched = d.DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", **_X0_CLIP
        )
    elif spec.sampler == "unipc":
        sched = d.UniPCMultistepScheduler.from_config(
            base, solver_order=2, timestep_spacing="trailing", **_X0_CLIP
        )
    elif spec.sampler == "lcm":
        sched = d.LCMScheduler.from_config(
            base, original_inference_steps=spec.original_inference_steps, clip_sample=True
        )
    else:
        raise ValueError(f"unknown sampler {spec.sampler!r}")
    sched.set_timesteps(spec.steps)
    return sched


def spec_takes_generator(sched: Any) -> bool:
    import inspect

    return "generator" in inspect.signature(sched.step).parameters


class DiffusionModel(nn.Module):
    """Denoiser + conditioner + noise schedule + sampling spec; ``sample`` counts NFE."""

    unet: Any  # a diffusers UNet2DModel
    conditioner: Any  # a ClassConditioner
    alphas_cumprod: torch.Tensor
    spec: SamplingSpec
    train_config: dict[str, Any]

    def __init__(
        self, unet: nn.Module, conditioner: nn.Module, train_config: dict[str, Any], spec: SamplingSpec
    ):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.train_config = dict(train_config)
        self.spec = spec
        betas = _diffusers().DDPMScheduler.from_config(self.train_config).alphas_cumprod
        self.register_buffer("alphas_cumprod", betas.clone().float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def guidance_embedded(self) -> bool:
        return getattr(self.conditioner, "guidance_mlp", None) is not None

    def with_spec(self, **changes: Any) -> DiffusionModel:
        """The same modules (shared, not copied) under a changed sampling spec."""
        out = copy.copy(self)
        out._modules = dict(self._modules)
        out._buffers = dict(self._buffers)
        out.spec = dataclasses.replace(self.spec, **changes)
        return out

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One network function evaluation: epsilon for (B,1,H,W) x at (B,) timesteps t."""
        if self.guidance_embedded and w is None:
            w = torch.full((x.shape[0],), self.spec.guidance_scale, device=x.device)
        emb = self.conditioner(labels, w) if self.guidance_embedded else self.conditioner(labels)
        return self.unet(x, t, class_labels=emb).sample

    def guided_eps(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        active: torch.Tensor | None = None,
        may_drop: bool = True,
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """Guided epsilon per the spec -> (eps, evaluations spent per image, still-guided mask).

        ``active`` (B,) bool marks samples whose uncond branch is still evaluated under
        adaptive guidance (Castillo et al., "Adaptive Guidance", 2023): once cosine(eps_c,
        eps_u) passes the threshold for a sample, later steps use eps_c alone for it.
        """
        b = x.shape[0]
        s = self.spec.guidance_scale
        if self.spec.guidance in ("embedded", "none") or s == 1.0 and self.spec.guidance == "cfg":
            w = torch.full((b,), s, device=x.device) if self.guidance_embedded else None
            return self(x, t, labels, w), 1.0, active
        if active is None:
            active = torch.ones(b, dtype=torch.bool, device=x.device)
        idx = active.nonzero().squeeze(1)
        null = torch.full((idx.numel(),), NULL_LABEL, dtype=labels.dtype, device=labels.device)
        both = self(
            torch.cat([x, x[idx]]), torch.cat([t, t[idx]]), torch.cat([labels, null])
        )  # (B + n_active, C, H, W)
        eps_c, eps_u_active = both[:b], both[b:]
        eps = eps_c.clone()
        eps[idx] = eps_u_active + s * (eps_c[idx] - eps_u_active)
        cost = 1.0 + idx.numel() / b
        if self.spec.adaptive_guidance_threshold is not None and idx.numel() and may_drop:
            cos = nn.functional.cosine_similarity(eps_c[idx].flatten(1), eps_u_active.flatten(1), dim=1)
            active = active.clone()
            active[idx[cos > self.spec.adaptive_guidance_threshold]] = False
        return eps, cost, active

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, float]:
        """Images (B,1,H,W) in [-1, 1] for ``labels`` and the NFE spent per image."""
        sched = make_scheduler(self.train_config, self.spec)
        size = int(self.unet.config.sample_size)
        chans = int(self.unet.config.in_channels)
        x = torch.randn((labels.shape[0], chans, size, size), generator=generator) * sched.init_noise_sigma
        nfe, active = 0.0, None
        warm = self.spec.adaptive_guidance_warmup * len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            tt = torch.full((labels.shape[0],), int(t), dtype=torch.long)
            eps, cost, active = self.guided_eps(
                sched.scale_model_input(x, t), tt, labels, active, i + 1 >= warm
            )
            nfe += cost
            kwargs = {"generator": generator} if spec_takes_generator(sched) else {}
            x = sched.step(eps, t, x, **kwargs).prev_sample
        return x.clamp(-1, 1), nfe


def _read_sampling(folder: Path) -> SamplingSpec:
    path = folder / "sampling.json"
    return SamplingSpec(**json.loads(path.read_text())) if path.exists() else SamplingSpec()


def from_class_unet(unet: nn.Module, train_config: dict[str, Any], spec: SamplingSpec) -> DiffusionModel:
    """Lift a class-conditional UNet2DModel's label embedding into a ClassConditioner."""
    from compressor.adapters.diffusion_modules import ClassConditioner

    emb = unet.class_embedding
    if not isinstance(emb, nn.Embedding):
        raise PassError(
            "the diffusers adapter needs a class-conditional UNet2DModel (num_class_embeds set, "
            f"class_embed_type None); this one has class_embedding {type(emb).__name__}"
        )
    cond = ClassConditioner(num_embeddings=emb.num_embeddings, embed_dim=emb.embedding_dim)
    cond.label_embedding.load_state_dict(emb.state_dict())
    unet.class_embedding = nn.Identity()
    unet.register_to_config(class_embed_type="identity", num_class_embeds=None)  # type: ignore[operator]
    return DiffusionModel(unet, cond, train_config, spec)


def load_diffusion_model(source: str | Path) -> DiffusionModel:
    """A teacher folder (unet/ + scheduler/, e.g. a DDPMPipeline) or an exported student folder."""
    d = _diffusers()
    folder = Path(source)
    if not (folder / "unet").is_dir():
        raise DataError(f"{folder}: not a diffusers pipeline folder with a unet/ subfolder")
    if (folder / "conditioner").is_dir():
        from compressor.adapters.diffusion_modules import StepReducedPipeline

        pipe = StepReducedPipeline.from_pretrained(folder)
        return pipe.to_diffusion_model().eval()  # type: ignore[no-any-return,return-value]
    unet = d.UNet2DModel.from_pretrained(folder / "unet").eval()
    train_config = dict(d.DDPMScheduler.load_config(folder / "scheduler"))
    return from_class_unet(unet, train_config, _read_sampling(folder)).eval()


class DenoiserGraph(nn.Module):
    """The traced ONNX graph: (x, t, labels[, w]) -> epsilon, one evaluation."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args)  # type: ignore[no-any-return]


class DiffusersAdapter(ModelAdapter):
    """Class-conditional diffusers UNet2DModel on the bundled digits."""

    name: ClassVar[str] = "diffusers"

    def __init__(self, eval_samples: int | None = None) -> None:
        self.eval_samples = eval_samples
        self._scorer: DigitsScorer | None = None

    def load(self, source: str) -> nn.Module:
        return load_diffusion_model(source)

    def scorer(self) -> DigitsScorer:
        if self._scorer is None:
            self._scorer = DigitsScorer(load_digits_split())
        return self._scorer

    def make_data(self, spec: Any, seed: int) -> DataSplits:
        corpus = getattr(spec, "corpus", "sklearn-digits")
        if corpus != "sklearn-digits":
            raise DataError(
                f"data.corpus: the diffusers adapter trains on images; set corpus: sklearn-digits, not {corpus!r}"
            )
        split = load_digits_split()
        bs = int(getattr(spec, "batch_size", 64))
        n_cal = int(getattr(spec, "calibration_samples", 128))
        n_eval = int(getattr(spec, "eval_samples", 500))
        self.eval_samples = self.eval_samples or n_eval
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(split.train_images.shape[0], generator=g)
        xs, ys = split.train_images[perm], split.train_labels[perm]

        def batches(x: torch.Tensor, y: torch.Tensor) -> list[Batch]:
            return [{"images": x[i : i + bs], "labels": y[i : i + bs]} for i in range(0, x.shape[0], bs)]

        return DataSplits(
            calibration=batches(xs[:n_cal], ys[:n_cal]),
            train=batches(xs, ys),
            eval=batches(split.eval_images, split.eval_labels),
            info={
                "corpus": "sklearn-digits",
                "train": int(xs.shape[0]),
                "eval": int(split.eval_images.shape[0]),
            },
        )

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Epsilon on the batch noised at fixed timesteps (used for calibration and fidelity)."""
        assert isinstance(model, DiffusionModel)
        x0, labels = batch["images"], batch["labels"]
        g = torch.Generator().manual_seed(1234)
        t = torch.randint(0, model.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        return model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, labels)

    def sample_and_score(self, model: DiffusionModel, n: int, seed: int = 0) -> dict[str, float]:
        labels = torch.arange(n) % NUM_CLASSES
        g = torch.Generator().manual_seed(seed)
        images, nfe = model.sample(labels, g)
        out = self.scorer().score(images, labels)
        out.update(nfe=nfe, steps=float(model.spec.steps))
        return out

    def metrics(self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        assert isinstance(model, DiffusionModel)
        n = self.eval_samples or sum(b["labels"].shape[0] for b in batches)
        out = self.sample_and_score(model, n)
        out["params"] = float(sum(p.numel() for p in model.parameters()))
        return out

    def linear_names(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("unet.")]

    def export_spec(self, model: nn.Module, batch: Batch, fused: bool = True) -> ExportSpec:
        assert isinstance(model, DiffusionModel)
        b = batch["images"].shape[0]
        size = int(model.unet.config.sample_size)
        x = torch.randn(b, int(model.unet.config.in_channels), size, size)
        t = torch.full((b,), model.num_train_timesteps // 2, dtype=torch.long)
        inputs: tuple[torch.Tensor, ...] = (x, t, batch["labels"].long())
        names: tuple[str, ...] = ("sample", "timestep", "class_labels")
        if model.guidance_embedded:
            inputs += (torch.full((b,), model.spec.guidance_scale),)
            names += ("guidance_scale",)
        return ExportSpec(
            module=DenoiserGraph(model).eval(),
            example_inputs=inputs,
            input_names=names,
            output_names=("noise_pred",),
            dynamic_axes={n: {0: "batch"} for n in (*names, "noise_pred")},
        )
