"""``DiffusersAdapter``: what the pipeline needs to know about diffusion models.

Loads a teacher or student folder, builds image batches from the bundled digits, runs
the denoiser on noised batches (calibration, distillation) and scores samples against
held-out real digits (Frechet distance in a classifier's feature space, class accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from compressor.adapters.base import Batch, DataSplits, ExportSpec, Headline, ModelAdapter
from compressor.adapters.diffusion.loading import load_diffusion_model
from compressor.adapters.diffusion.model import DenoiserGraph, DiffusionModel
from compressor.adapters.digits import NUM_CLASSES, DigitsScorer, load_digits_split
from compressor.errors import DataError


class DiffusersAdapter(ModelAdapter):
    """Diffusers denoisers (class- or text-conditional) on the bundled digits."""

    name: ClassVar[str] = "diffusers"
    headline: ClassVar[Headline] = Headline(
        "fd", "Frechet distance to held-out real digits", higher_is_better=False
    )
    fidelity_metrics: ClassVar[frozenset[str]] = frozenset({"fd", "class_acc", "nfe", "steps"})

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
