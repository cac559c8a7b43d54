"""Real 8x8 digits for diffusion work: splits, a feature classifier, and Frechet distance.

scikit-learn ships the UCI handwritten digits (1,797 images, 8x8, 17 grey levels) on
every machine, so the step-reduction passes and their benchmark use real data without
a download. Quality is measured like FID (Heusel et al., 2017), only in the feature
space of a small MLP classifier trained on real digits: the Frechet distance between
Gaussians fitted to the classifier's last hidden layer on generated and on held-out
real images, plus the classifier's accuracy on class-conditional samples (does a
sample drawn for label 3 look like a 3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

NUM_CLASSES = 10
NULL_LABEL = 10  # the "no class" label used for classifier-free guidance
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the conditions of a text-conditional denoiser: label i <-> prompt i, the null label <-> ""
DIGIT_PROMPTS = (*[f"a handwritten digit {w}" for w in _WORDS], "")


def _sklearn() -> Any:
    try:
        import sklearn.datasets
        import sklearn.model_selection
        import sklearn.neural_network
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the digits data and classifier need scikit-learn: pip install 'compressor[diffusion]'"
        ) from e
    return sklearn


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [-1, 1] as (N, C, H, W) float32 ((N, 1, 8, 8) for the digits), labels as (N,) int64.

    The digits' own split, or one made from the user's image folder (``images_to_tensor``)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor


def load_digits_split(eval_fraction: float = 1 / 3, seed: int = 0) -> DigitsSplit:
    """A stratified train / held-out split of the bundled digits (the same for every caller)."""
    sk = _sklearn()
    data = sk.datasets.load_digits()
    x = (data.images.astype(np.float32) / 16.0) * 2.0 - 1.0  # (N, 8, 8) in [-1, 1]
    y = data.target.astype(np.int64)
    xtr, xev, ytr, yev = sk.model_selection.train_test_split(
        x, y, test_size=eval_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(
        torch.from_numpy(xtr).unsqueeze(1),
        torch.from_numpy(ytr),
        torch.from_numpy(xev).unsqueeze(1),
        torch.from_numpy(yev),
    )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> (N, C, H, W) float32 in [-1, 1], the digits' range."""
    x = (images.astype(np.float32) / 255.0) * 2.0 - 1.0
    t = torch.from_numpy(x)
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


class DigitsClassifier:
    """An MLP (64 -> 128 -> 64 -> 10) on real digits; its 64-d hidden layer is the FD feature space.

    Trained on a user's image folder, its input is the flattened C*H*W pixels and its output
    that folder's classes."""

    def __init__(self, split: DigitsSplit, seed: int = 0) -> None:
        sk = _sklearn()
        self.mlp = sk.neural_network.MLPClassifier(
            hidden_layer_sizes=(128, 64), max_iter=600, random_state=seed, alpha=1e-3
        )
        self.mlp.fit(self._flat(split.train_images), split.train_labels.numpy())
        self.heldout_accuracy = float((self.predict(split.eval_images) == split.eval_labels.numpy()).mean())
        log.info("feature classifier: held-out accuracy %.3f", self.heldout_accuracy)

    @staticmethod
    def _flat(images: torch.Tensor) -> np.ndarray:
        # (N, C, H, W) in [-1, 1] -> (N, C*H*W) in [0, 1], the classifier's input scale
        x = images.detach().float().clamp(-1, 1).reshape(images.shape[0], -1).cpu().numpy()
        return (x + 1.0) / 2.0

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.mlp.predict(self._flat(images))

    def features(self, images: torch.Tensor) -> np.ndarray:
        """The last hidden layer's ReLU activations, (N, 64)."""
        h = self._flat(images)
        for w, b in zip(self.mlp.coefs_[:-1], self.mlp.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), the FID formula."""
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.cov(feats_a, rowvar=False)
    cov_b = np.cov(feats_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(cov_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


class DigitsScorer:
    """FD against held-out real digits and class accuracy of conditional samples."""

    def __init__(self, split: DigitsSplit, seed: int = 0) -> None:
        self.classifier = DigitsClassifier(split, seed)
        self.real_features = self.classifier.features(split.eval_images)
        self.reference_fd = frechet_distance(self.classifier.features(split.train_images), self.real_features)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        fd = frechet_distance(self.classifier.features(images), self.real_features)
        acc = float((self.classifier.predict(images) == labels.cpu().numpy()).mean())
        return {"fd": fd, "class_acc": acc}
