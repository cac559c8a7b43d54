"""``DiffusersAdapter``: what the pipeline needs to know about diffusion models.

Loads a teacher or student folder, builds image batches from the bundled digits or from the
recipe's own image folder (``data.source``: class subfolders), runs the denoiser on noised
batches (calibration, distillation) and scores samples against the held-out real images
(Frechet distance in a classifier's feature space, class accuracy); with an image folder the
classifier is trained on that folder's train split.

An image folder is split by hash (``compressor.image_folder.image_splits``): the train and
calibration images are the pool calibration batches are drawn from and distillation trains
on (as the digits' train split is), the held-out eval images are only scored against. The
images must fit the model the adapter loaded: its sample size, input channels, and class
embedding (the class-conditional denoisers; the null class stays label ``NULL_LABEL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from compressor.adapters.base import Batch, DataSplits, ExportSpec, Headline, ModelAdapter, TimingInputs
from compressor.adapters.diffusion.conditioners import ClassConditioner, LabelConditioner
from compressor.adapters.diffusion.loading import load_diffusion_model
from compressor.adapters.diffusion.model import DenoiserGraph, DiffusionModel
from compressor.adapters.digits import (
    NULL_LABEL,
    NUM_CLASSES,
    DigitsScorer,
    DigitsSplit,
    frechet_distance,
    images_to_tensor,
    load_digits_split,
)
from compressor.errors import DataError
from compressor.image_folder import ImageSet, image_splits, read_image_folder

MIN_HELD_OUT_IMAGES = 2  # the Frechet distance fits a covariance to the held-out features


@dataclass(frozen=True)
class ModelFit:
    """What images a loaded model takes: (channels, size, size) and how many classes (None: text)."""

    channels: int
    size: int | None  # None: the config names no square sample size (checked when sampling)
    classes: int | None
    kind: str

    @classmethod
    def of(cls, model: DiffusionModel) -> ModelFit:
        cfg = model.unet.config
        cond = model.conditioner
        if isinstance(cond, ClassConditioner):
            embeds: int | None = int(cond.label_embedding.num_embeddings)
        elif isinstance(cond, LabelConditioner):
            embeds = int(cond.label_map.shape[0])
        else:
            embeds = None  # text-conditional: conditions index a prompt table
        # labels 0..K-1 must stay clear of the null label and inside the embedding
        classes = None if embeds is None else min(embeds - 1, NULL_LABEL)
        size = cfg.get("sample_size")
        square = int(size) if isinstance(size, int) else None
        return cls(int(cfg.in_channels), square, classes, type(model.unet).__name__)


def _check_fits(images: ImageSet, fit: ModelFit, where: str) -> None:
    if fit.classes is None:
        raise DataError(
            f"{where}: class subfolders need a class-conditional pipeline (UNet2DModel with class embeddings, "
            f"or DiT); this {fit.kind} is text-conditional"
        )
    h, w = images.images.shape[1:3]
    size = (h, w) if fit.size is None else (fit.size, fit.size)
    if (images.channels, h, w) != (fit.channels, *size):
        raise DataError(
            f"{where}: the images are {w}x{h} with {images.channels} channel(s); the model's {fit.kind} takes "
            f"{size[1]}x{size[0]} with {fit.channels}: resize or convert the images"
        )
    if len(images.classes) > fit.classes:
        raise DataError(
            f"{where}: {len(images.classes)} class subfolders, more than the {fit.classes} classes the model's "
            f"class embedding holds (besides the null class): merge classes or use a model with more"
        )


def image_folder_split(spec: Any, fit: ModelFit | None) -> tuple[DigitsSplit, dict[str, Any], int]:
    """The recipe's image folder as a split (train = the train + calibration hash splits), the
    data info for the manifest, and its number of classes."""
    for name in ("calibration_source", "train_source", "eval_source"):
        if getattr(spec, name, None) is not None:
            raise DataError(
                f"data.{name}: the diffusers adapter reads one image folder from data.source and splits it "
                f"by hash; drop data.{name}"
            )
    where = "data.source"
    images = read_image_folder(spec.source, where)
    if images.labels is None:
        raise DataError(
            f"{where}: captions need a text-conditional pipeline; class subfolders work with the "
            "class-conditional ones"
        )
    if len(images.classes) < 2:
        raise DataError(
            f"{where}: one class subfolder ({images.classes[0]!r}); the classifier that scores samples needs "
            "at least 2 classes"
        )
    if fit is not None:
        _check_fits(images, fit, where)
    idx = image_splits(images)
    pool = torch.from_numpy(np.sort(np.concatenate([idx["train"], idx["calibration"]])))
    held = torch.from_numpy(idx["eval"])
    total = len(images.names)
    n_cal = int(getattr(spec, "calibration_samples", 128))
    if pool.numel() < n_cal:
        raise DataError(
            f"{where}: {pool.numel()} train + calibration images (80% of {total} by hash), the recipe asks for "
            f"{n_cal} calibration images: lower data.calibration_samples or give more images"
        )
    if held.numel() < MIN_HELD_OUT_IMAGES:
        raise DataError(
            f"{where}: {held.numel()} held-out images (20% of {total} by hash); the Frechet distance needs at "
            f"least {MIN_HELD_OUT_IMAGES}: give more images"
        )
    y = torch.from_numpy(images.labels.copy())
    if y[pool].unique().numel() < 2:
        raise DataError(
            f"{where}: the train + calibration images (80% of {total} by hash) hold one class; the classifier "
            "that scores samples needs at least 2: give more images"
        )
    x = images_to_tensor(images.images)
    split = DigitsSplit(x[pool], y[pool], x[held], y[held])
    info = {"source": str(spec.source), "classes": list(images.classes), "images": total}
    return split, info, len(images.classes)


class DiffusersAdapter(ModelAdapter):
    """Diffusers denoisers (class- or text-conditional) on the bundled digits or an image folder."""

    name: ClassVar[str] = "diffusers"
    headline: ClassVar[Headline] = Headline(
        "fd", "Frechet distance to held-out real digits", higher_is_better=False
    )
    fidelity_metrics: ClassVar[frozenset[str]] = frozenset({"fd", "class_acc", "nfe", "steps"})

    def __init__(self, eval_samples: int | None = None) -> None:
        self.eval_samples = eval_samples
        self._scorer: DigitsScorer | None = None
        self._images: DigitsSplit | None = None  # the recipe's image folder, once make_data read it
        self._num_classes = NUM_CLASSES
        self._fit: ModelFit | None = None  # the last loaded model's, for checking an image folder
        self._loaded: DiffusionModel | None = None  # the last loaded model (its inputs are timed)

    def load(self, source: str) -> nn.Module:
        model = load_diffusion_model(source)
        self._fit = ModelFit.of(model)
        self._loaded = model
        return model

    def scorer(self) -> DigitsScorer:
        if self._scorer is None:
            self._scorer = DigitsScorer(self._images if self._images is not None else load_digits_split())
        return self._scorer

    def make_data(self, spec: Any, seed: int) -> DataSplits:
        """Batches of the digits, or of the image folder ``spec.source`` names (checked against
        the model this adapter loaded, when it loaded one)."""
        if getattr(spec, "source", None) is not None:
            split, info, self._num_classes = image_folder_split(spec, self._fit)
            self._images, self._scorer = split, None
        else:
            corpus = getattr(spec, "corpus", "sklearn-digits")
            if corpus != "sklearn-digits":
                raise DataError(
                    f"data.corpus: the diffusers adapter trains on images; set corpus: sklearn-digits, not "
                    f"{corpus!r}, or data.source: an image folder"
                )
            if self._images is not None:  # an earlier make_data read an image folder
                self._images, self._scorer, self._num_classes = None, None, NUM_CLASSES
            split = load_digits_split()
            info = {"corpus": "sklearn-digits"}
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
            info={**info, "train": int(xs.shape[0]), "eval": int(split.eval_images.shape[0])},
        )

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model output on the batch noised at fixed timesteps (calibration and fidelity)."""
        assert isinstance(model, DiffusionModel)
        x0, labels = batch["images"], batch["labels"]
        g = torch.Generator().manual_seed(1234)
        t = torch.randint(0, model.num_train_timesteps, (x0.shape[0],), generator=g)
        x = model.schedule.add_noise(x0, t, torch.randn(x0.shape, generator=g))
        return model(x, model.schedule.model_t(t), labels)

    def _sample(self, model: DiffusionModel, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        labels = torch.arange(n) % self._num_classes
        g = torch.Generator().manual_seed(seed)
        images, nfe = model.sample(labels, g)
        return images, labels, nfe

    def sample_and_score(self, model: DiffusionModel, n: int, seed: int = 0) -> dict[str, float]:
        images, labels, nfe = self._sample(model, n, seed)
        out = self.scorer().score(images, labels)
        out.update(nfe=nfe, steps=float(model.spec.steps))
        return out

    def sample_images(self, model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` samples for the labels 0, 1, ... in turn, from fixed noise (``compressor tune``
        compares a model's to its teacher's, sample for sample)."""
        assert isinstance(model, DiffusionModel)
        return self._sample(model, n, seed)[0]

    def sample_fd(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        """The Frechet distance between two sets of images in the scoring classifier's features."""
        classifier = self.scorer().classifier
        return frechet_distance(classifier.features(images), classifier.features(reference))

    def timing_inputs(self) -> TimingInputs | None:
        """The denoiser graph's own inputs (a noisy sample, a mid timestep, labels) at a batch
        size; the sequence length means nothing to a denoiser and is ignored."""
        model = self._loaded
        if model is None:
            return None
        cfg = model.unet.config
        channels, size = int(cfg.in_channels), int(cfg.sample_size)

        def example(batch: int = 2) -> Batch:
            images = torch.zeros(batch, channels, size, size)
            return {"images": images, "labels": torch.arange(batch) % self._num_classes}

        def timing(batch: int, seq_len: int) -> Batch:
            with torch.random.fork_rng(devices=[]):  # the same noise every time, the global RNG untouched
                torch.manual_seed(0)
                spec = self.export_spec(model, example(batch))
            return dict(zip(spec.input_names, spec.example_inputs, strict=True))

        return TimingInputs(example=example, timing=timing)

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
