"""The diffusion model the pipeline carries: a diffusers denoiser plus its sampling recipe.

``DiffusionModel`` is an ``nn.Module`` holding the denoiser, the conditioner that turns
a condition (and, after guidance distillation, a guidance scale) into the denoiser's
conditioning inputs, the training noise schedule, and a ``SamplingSpec``: which
diffusers scheduler, how many steps, and how guidance is applied (classifier-free
guidance with two evaluations, an embedded guidance scale with one, or none).
Step-reduction passes return a *student* ``DiffusionModel``: a new denoiser and a spec
with N steps. Because the student is the model the pipeline carries, any later pass
(quantization, sparsity) that walks the module tree acts on the student's denoiser.

Covered denoisers:
- class-conditional ``UNet2DModel`` (the label embedding lifted into a ``ClassConditioner``);
- class-conditional ``DiTTransformer2DModel`` (labels passed as indices by a
  ``LabelConditioner``: DiT embeds them inside every block, so it takes no guidance
  embedding; step distillation bakes the CFG scale into its student instead);
- text-conditional ``UNet2DConditionModel`` (cross-attention on prompt token embeddings)
  and ``SD3Transformer2DModel`` (the MMDiT of Stable Diffusion 3: joint attention on prompt
  tokens plus a pooled prompt embedding), through a ``TextConditioner`` that holds a table
  of prompts encoded once by a real text encoder; conditions index that table.
Training objectives (``diffusion_schedule``): epsilon prediction on DDPM schedules,
sampled by DDIM, DPM-Solver++, UniPC or LCM; flow matching (velocity prediction, static
shift), sampled by FlowMatchEuler, FlowMatchLCM, or the flow variants of DPM-Solver++ /
UniPC. All with classifier-free guidance. Not covered: v-prediction, dynamic shifting,
guidance distillation of a DiT, latent (VAE) pipelines: the digits are denoised in pixel
space.
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
from compressor.adapters.diffusion_schedule import (
    NoiseSchedule,
    _diffusers,
    make_scheduler,
    training_schedule,
)
from compressor.adapters.digits import DIGIT_PROMPTS, NULL_LABEL, NUM_CLASSES, DigitsScorer, load_digits_split
from compressor.errors import DataError, PassError

log = logging.getLogger(__name__)

Sampler = Literal["ddim", "dpmsolver++", "unipc", "lcm"]
Guidance = Literal["cfg", "embedded", "none"]


@dataclass(frozen=True)
class SamplingSpec:
    """How the model is sampled: scheduler, step count and guidance.

    ``ddim`` is the deterministic first-order sampler: DDIM for epsilon models, the Euler
    step (FlowMatchEulerDiscreteScheduler) for flow-matching models.
    """

    sampler: Sampler = "ddim"
    steps: int = 50
    guidance: Guidance = "cfg"
    guidance_scale: float = 2.0
    adaptive_guidance_threshold: float | None = None  # cosine(out_c, out_u) above which uncond is dropped
    adaptive_guidance_warmup: float = 0.3  # fraction of steps always guided (at pure noise eps_c ~ eps_u ~ x)
    original_inference_steps: int = 50  # the LCM skipping-step grid a consistency student was trained on


def spec_takes_generator(sched: Any) -> bool:
    import inspect

    return "generator" in inspect.signature(sched.step).parameters


DENOISERS = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "DiTTransformer2DModel")


def denoiser_component(denoiser: nn.Module) -> str:
    """The pipeline component name diffusers gives this denoiser: ``unet`` or ``transformer``."""
    return "transformer" if "Transformer" in type(denoiser).__name__ else "unet"


class DiffusionModel(nn.Module):
    """Denoiser + conditioner + noise schedule + sampling spec; ``sample`` counts NFE.

    ``unet`` holds the denoiser whatever its kind (UNet2DModel, UNet2DConditionModel,
    SD3Transformer2DModel or DiTTransformer2DModel; the attribute name keeps layer names
    such as ``unet.…`` stable across kinds). ``forward`` takes the timestep the denoiser is fed (what the scheduler
    yields); the passes map integer training timesteps to it with ``schedule.model_t``.
    """

    unet: Any
    conditioner: Any  # a ClassConditioner, LabelConditioner or TextConditioner
    schedule: NoiseSchedule
    spec: SamplingSpec
    train_config: dict[str, Any]

    def __init__(
        self, unet: nn.Module, conditioner: nn.Module, train_config: dict[str, Any], spec: SamplingSpec
    ):
        super().__init__()
        kind = type(unet).__name__
        if kind not in DENOISERS:
            raise PassError(f"the diffusers adapter supports denoisers {list(DENOISERS)}, not {kind}")
        self.unet = unet
        self.conditioner = conditioner
        self.train_config = training_schedule(train_config)
        self.spec = spec
        self.schedule = NoiseSchedule(self.train_config)
        self._x_arg = "hidden_states" if "Transformer" in kind else "sample"
        cfg: Any = unet.config
        # a learned-variance denoiser (DiT's out_channels = 2 x in) returns [output, variance]
        self._out_channels = int(cfg.in_channels) if cfg.out_channels == 2 * cfg.in_channels else None

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

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
        """One network function evaluation on (B,C,H,W) x at denoiser timesteps t: the model's
        output (epsilon, or velocity for flow models). ``labels`` index the conditions (digit
        classes, or the prompts of a text conditioner); the last one is the null condition."""
        if self.guidance_embedded and w is None:
            w = torch.full((x.shape[0],), self.spec.guidance_scale, device=x.device)
        cond = self.conditioner(labels, w) if self.guidance_embedded else self.conditioner(labels)
        out = self.unet(**{self._x_arg: x}, timestep=t, **cond).sample
        return out if self._out_channels is None else out[:, : self._out_channels]  # type: ignore[no-any-return]

    def guided(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        active: torch.Tensor | None = None,
        may_drop: bool = True,
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """Guided output per the spec -> (output, evaluations spent per image, still-guided mask).

        ``active`` (B,) bool marks samples whose uncond branch is still evaluated under
        adaptive guidance (Castillo et al., "Adaptive Guidance", 2023): once cosine(out_c,
        out_u) passes the threshold for a sample, later steps use out_c alone for it. The
        combination is linear, so it is the same in epsilon and in velocity space.
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
        out_c, out_u_active = both[:b], both[b:]
        out = out_c.clone()
        out[idx] = out_u_active + s * (out_c[idx] - out_u_active)
        cost = 1.0 + idx.numel() / b
        if self.spec.adaptive_guidance_threshold is not None and idx.numel() and may_drop:
            cos = nn.functional.cosine_similarity(out_c[idx].flatten(1), out_u_active.flatten(1), dim=1)
            active = active.clone()
            active[idx[cos > self.spec.adaptive_guidance_threshold]] = False
        return out, cost, active

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, float]:
        """Images (B,C,H,W) in [-1, 1] for ``labels`` and the NFE spent per image."""
        sched = make_scheduler(self.train_config, self.spec)
        size = int(self.unet.config.sample_size)
        chans = int(self.unet.config.in_channels)
        sigma0 = float(getattr(sched, "init_noise_sigma", None) or 1.0)
        x = torch.randn((labels.shape[0], chans, size, size), generator=generator) * sigma0
        scale = getattr(sched, "scale_model_input", lambda x, t: x)
        nfe, active = 0.0, None
        warm = self.spec.adaptive_guidance_warmup * len(sched.timesteps)
        kwargs = {"generator": generator} if spec_takes_generator(sched) else {}
        for i, t in enumerate(sched.timesteps):
            tt = (
                t.expand(labels.shape[0]) if t.is_floating_point() else torch.full((labels.shape[0],), int(t))
            )
            out, cost, active = self.guided(scale(x, t), tt, labels, active, i + 1 >= warm)
            nfe += cost
            x = sched.step(out, t, x, **kwargs).prev_sample
        return x.clamp(-1, 1), nfe


def _read_sampling(folder: Path) -> SamplingSpec:
    path = folder / "sampling.json"
    return SamplingSpec(**json.loads(path.read_text())) if path.exists() else SamplingSpec()


def from_class_unet(unet: nn.Module, train_config: dict[str, Any], spec: SamplingSpec) -> DiffusionModel:
    """Lift a class-conditional UNet2DModel's label embedding into a ClassConditioner."""
    from compressor.adapters.diffusion_modules import ClassConditioner

    emb = getattr(unet, "class_embedding", None)
    if type(unet).__name__ != "UNet2DModel" or not isinstance(emb, nn.Embedding):
        raise PassError(
            "a class-conditional denoiser must be a UNet2DModel with num_class_embeds set and "
            f"class_embed_type None; this {type(unet).__name__} has class_embedding {type(emb).__name__}"
        )
    cond = ClassConditioner(num_embeddings=emb.num_embeddings, embed_dim=emb.embedding_dim)
    cond.label_embedding.load_state_dict(emb.state_dict())
    unet.class_embedding = nn.Identity()
    unet.register_to_config(class_embed_type="identity", num_class_embeds=None)  # type: ignore[operator]
    return DiffusionModel(unet, cond, train_config, spec)


def from_dit(dit: Any, train_config: dict[str, Any], spec: SamplingSpec) -> DiffusionModel:
    """A class-conditional DiTTransformer2DModel (Peebles & Xie, 2023) under a LabelConditioner.

    DiT embeds the class inside every block's adaLN-Zero (its own label table per block,
    the null class at index ``num_embeds_ada_norm``), so the label goes in as an index; the
    tables' random label dropout (training mode only) is switched off, since the passes
    train students in training mode and choose the null label themselves.
    """
    from compressor.adapters.diffusion_modules import LabelConditioner

    cfg = dit.config
    if cfg.norm_type != "ada_norm_zero" or not cfg.num_embeds_ada_norm:
        raise PassError(
            "a DiTTransformer2DModel must be class-conditional (norm_type ada_norm_zero, num_embeds_ada_norm "
            f"set); this one has norm_type {cfg.norm_type!r}, num_embeds_ada_norm {cfg.num_embeds_ada_norm}"
        )
    if int(cfg.num_embeds_ada_norm) != NUM_CLASSES:
        raise DataError(
            f"the DiT has {cfg.num_embeds_ada_norm} classes; the digits conditions need {NUM_CLASSES} "
            f"(its null class, index {NUM_CLASSES}, is the null label)"
        )
    for m in dit.modules():
        if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):  # diffusers LabelEmbedding
            m.dropout_prob = 0.0
    return DiffusionModel(dit, LabelConditioner(num_classes=int(cfg.num_embeds_ada_norm)), train_config, spec)


def from_text_denoiser(
    denoiser: Any,
    train_config: dict[str, Any],
    spec: SamplingSpec,
    prompts: Sequence[str],
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor | None = None,
) -> DiffusionModel:
    """A text-conditional denoiser (UNet2DConditionModel or SD3Transformer2DModel) over a table
    of encoded prompts; ``labels`` index the table, the last prompt is the null prompt ""."""
    from compressor.adapters.diffusion_modules import TextConditioner

    kind = type(denoiser).__name__
    cfg: Any = denoiser.config
    if kind == "UNet2DConditionModel":
        want, guidance_dim = int(cfg.cross_attention_dim), int(denoiser.time_embedding.linear_2.out_features)
        target = "class_labels"
    elif kind == "SD3Transformer2DModel":
        want, guidance_dim, target = (
            int(cfg.joint_attention_dim),
            int(cfg.pooled_projection_dim),
            "pooled_projections",
        )
        if pooled_embeds is None:
            raise DataError("an SD3 transformer needs pooled prompt embeddings (pooled_projections)")
        if pooled_embeds.shape[-1] != guidance_dim:
            raise DataError(f"pooled prompt embeddings are {pooled_embeds.shape[-1]} wide; the transformer's "
                            f"pooled_projection_dim is {guidance_dim}")  # fmt: skip
    else:
        raise PassError(
            f"a text-conditional denoiser must be a UNet2DConditionModel or SD3Transformer2DModel, not {kind}"
        )
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != len(prompts) or prompt_embeds.shape[-1] != want:
        raise DataError(
            f"prompt embeddings {tuple(prompt_embeds.shape)} do not fit: need ({len(prompts)} prompts, "
            f"tokens, {want}) for this {kind}"
        )
    if prompts[-1] != "":
        raise DataError('the last prompt of a text-conditional table must be the null prompt ""')
    cond = TextConditioner(
        prompts=list(prompts),
        max_length=int(prompt_embeds.shape[1]),
        text_dim=want,
        pooled_dim=0 if pooled_embeds is None else int(pooled_embeds.shape[-1]),
        guidance_target=target,
        guidance_embed_dim=guidance_dim,
    )
    cond.prompt_embeds.copy_(prompt_embeds)
    if pooled_embeds is not None:
        cond.pooled_embeds.copy_(pooled_embeds)
    return DiffusionModel(denoiser, cond, train_config, spec)


def encode_prompts(
    text_encoder: str | Path,
    prompts: Sequence[str],
    max_length: int = 16,
    tokenizer: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (P, max_length, D) and pooled embeddings (P, D) of ``prompts`` from a
    local Hugging Face encoder folder (last hidden state; pooled = mean over real tokens)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer or text_encoder))
    enc = safe_from_pretrained(AutoModel, Path(text_encoder)).eval()
    batch = tok(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return hidden, pooled


def safe_from_pretrained(cls: Any, folder: Path) -> Any:
    """``cls.from_pretrained(folder, use_safetensors=True)``: pickle checkpoints (``.bin``) can
    run code when loaded, so a folder without safetensors weights is refused by name."""
    try:
        return cls.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError) as e:
        pickles = sorted(p.name for p in Path(folder).rglob("*.bin"))
        found = f" (found pickle checkpoints {', '.join(pickles)})" if pickles else ""
        raise DataError(
            f"{folder}: could not load safetensors weights{found}; pickle checkpoints can run code when "
            f"loaded and are refused: convert them to .safetensors ({e})"
        ) from None


# Where benchmarks/train_digits_teacher.py writes its teachers, as the shipped recipes name them.
DIGITS_TEACHER_HINT = (
    "benchmarks/.cache/digits-teacher; with --denoiser mmdit-flow: benchmarks/.cache/digits-teacher-flow"
)


def load_diffusion_model(source: str | Path) -> DiffusionModel:
    """A teacher folder or an exported student folder.

    A teacher is a diffusers pipeline folder: ``unet/`` or ``transformer/`` plus
    ``scheduler/`` (DDPM-type or FlowMatchEuler). A class-conditional UNet2DModel needs
    nothing else; a text-conditional denoiser (UNet2DConditionModel, SD3Transformer2DModel)
    also needs ``text_encoder/`` (and ``tokenizer/``, else the encoder folder's tokenizer),
    which encodes the digit prompts once. An optional ``sampling.json`` holds the teacher's
    SamplingSpec.
    """
    d = _diffusers()
    folder = Path(source)
    if (folder / "conditioner").is_dir():
        from compressor.adapters.diffusion_modules import StepReducedPipeline

        pipe = safe_from_pretrained(StepReducedPipeline, folder)
        return pipe.to_diffusion_model().eval()  # type: ignore[no-any-return]
    sub = next((folder / n for n in ("unet", "transformer") if (folder / n).is_dir()), None)
    if sub is None or not (folder / "scheduler").is_dir():
        what = "does not exist" if not folder.exists() else "is not a diffusers pipeline folder"
        raise DataError(
            f"{folder}: {what} (a folder with unet/ or transformer/ and scheduler/, as diffusers' "
            "save_pretrained writes); the digits teacher the shipped digits recipes use is made by "
            f"`python benchmarks/train_digits_teacher.py` (writes {DIGITS_TEACHER_HINT})"
        )
    kind = json.loads((sub / "config.json").read_text()).get("_class_name")
    if kind not in DENOISERS:
        raise DataError(f"{sub}: denoiser {kind!r} is not supported (supported: {list(DENOISERS)})")
    denoiser = safe_from_pretrained(getattr(d, kind), sub).eval()
    train_config = training_schedule(dict(d.DDPMScheduler.load_config(folder / "scheduler")))
    spec = _read_sampling(folder)
    if kind == "UNet2DModel":
        return from_class_unet(denoiser, train_config, spec).eval()
    if kind == "DiTTransformer2DModel":
        return from_dit(denoiser, train_config, spec).eval()
    if not (folder / "text_encoder").is_dir():
        raise DataError(
            f"{folder}: a text-conditional {kind} needs a text_encoder/ folder to encode its prompts"
        )
    tokenizer = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    embeds, pooled = encode_prompts(folder / "text_encoder", DIGIT_PROMPTS, tokenizer=tokenizer)
    use_pooled = pooled if kind == "SD3Transformer2DModel" else None
    return from_text_denoiser(denoiser, train_config, spec, DIGIT_PROMPTS, embeds, use_pooled).eval()


class DenoiserGraph(nn.Module):
    """The traced ONNX graph: (x, t, labels[, w]) -> epsilon, one evaluation."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args)  # type: ignore[no-any-return]


class DiffusersAdapter(ModelAdapter):
    """Diffusers denoisers (class- or text-conditional) on the bundled digits."""

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
        """The model output on the batch noised at fixed timesteps (calibration and fidelity)."""
        assert isinstance(model, DiffusionModel)
        x0, labels = batch["images"], batch["labels"]
        g = torch.Generator().manual_seed(1234)
        t = torch.randint(0, model.num_train_timesteps, (x0.shape[0],), generator=g)
        x = model.schedule.add_noise(x0, t, torch.randn(x0.shape, generator=g))
        return model(x, model.schedule.model_t(t), labels)

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
        t = model.schedule.model_t(torch.full((b,), model.num_train_timesteps // 2, dtype=torch.long))
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
