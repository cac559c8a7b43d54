"""The diffusers adapter on the recipe's own image folder: batches, scorer, refusals, a compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from compressor.adapters.diffusion.adapter import DiffusersAdapter  # noqa: E402
from compressor.adapters.digits import load_digits_split  # noqa: E402
from compressor.errors import DataError  # noqa: E402
from compressor.recipe import DataSpec  # noqa: E402
from compressor.sources import image_splits, read_image_folder  # noqa: E402
from tests.helpers.diffusion import save_tiny_teacher, tiny_teacher  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread
Image = pytest.importorskip("PIL.Image")


def _digit_folder(root: Path, classes: tuple[int, ...] = (0, 1, 2), per_class: int = 30) -> Path:
    """Real 8x8 digits as grayscale PNGs in class subfolders (the digits' 17 levels -> 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        (root / f"digit-{c}").mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            pixels = np.round(d.images[i] * 255.0 / 16.0).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"digit-{c}" / f"{k:03d}.png")
    return root


def _teacher_folder(folder: Path, num_class_embeds: int = 11) -> Path:
    return save_tiny_teacher(folder, num_class_embeds)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _teacher_folder(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _digit_folder(tmp_path_factory.mktemp("images"))


def _spec(folder: Path, **kw: Any) -> DataSpec:
    return DataSpec(
        **{"source": str(folder), "calibration_samples": 16, "eval_samples": 12, "batch_size": 16, **kw}
    )


def test_folder_batches_follow_the_hash_splits_in_the_digits_range(
    teacher_dir: Path, digit_folder: Path
) -> None:
    adapter = DiffusersAdapter()
    adapter.load(str(teacher_dir))
    data = adapter.make_data(_spec(digit_folder), seed=0)
    images = read_image_folder(digit_folder)
    idx = image_splits(images)
    n_pool, n_eval = len(idx["train"]) + len(idx["calibration"]), len(idx["eval"])
    assert data.info == {
        "source": str(digit_folder),
        "classes": ["digit-0", "digit-1", "digit-2"],
        "images": 90,
        "train": n_pool,
        "eval": n_eval,
    }
    assert sum(b["images"].shape[0] for b in data.calibration) == 16
    train = torch.cat([b["images"] for b in data.train])
    assert train.shape == (n_pool, 1, 8, 8) and train.dtype == torch.float32
    assert train.min() == -1.0 and train.max() == 1.0  # the digits' value range
    # the held-out batches are exactly the eval-split images, in order
    held = torch.cat([b["images"] for b in data.eval])
    want = torch.from_numpy(images.images[idx["eval"]].astype(np.float32) / 255.0 * 2 - 1).unsqueeze(1)
    torch.testing.assert_close(held, want)
    assert torch.cat([b["labels"] for b in data.eval]).tolist() == images.labels[idx["eval"]].tolist()
    # the digits' scale: a digit saved as an 8-bit PNG decodes to its digits tensor value, within a grey level
    levels = torch.unique(load_digits_split().train_images)
    gap = (torch.unique(train)[:, None] - levels[None, :]).abs().min(1).values
    assert gap.max() <= 1 / 255 + 1e-6
    # the scorer is trained on this folder (3 classes), not on the digits
    scorer = adapter.scorer()
    assert scorer.real_features.shape[0] == n_eval
    assert list(scorer.classifier.mlp.classes_) == [0, 1, 2]
    scores = adapter.sample_and_score(adapter.load(str(teacher_dir)), 6)
    assert np.isfinite(scores["fd"]) and 0.0 <= scores["class_acc"] <= 1.0


def test_digits_path_is_unchanged_after_a_folder(teacher_dir: Path, digit_folder: Path) -> None:
    fresh = DiffusersAdapter().make_data(DataSpec(corpus="sklearn-digits", calibration_samples=32), seed=3)
    adapter = DiffusersAdapter()
    adapter.make_data(_spec(digit_folder), seed=0)  # no model loaded: nothing to check the images against
    again = adapter.make_data(DataSpec(corpus="sklearn-digits", calibration_samples=32), seed=3)
    assert again.info == fresh.info == {"corpus": "sklearn-digits", "train": 1198, "eval": 599}
    for a, b in zip(
        again.calibration + again.train + again.eval, fresh.calibration + fresh.train + fresh.eval
    ):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert list(adapter.scorer().classifier.mlp.classes_) == list(range(10))


def _refused(adapter: DiffusersAdapter, spec: DataSpec, match: str) -> None:
    with pytest.raises(DataError, match=match) as e:
        adapter.make_data(spec, seed=0)
    assert "\n" not in str(e.value)


def test_images_that_do_not_fit_the_model_are_refused(teacher_dir: Path, tmp_path: Path) -> None:
    adapter = DiffusersAdapter()
    adapter.load(str(teacher_dir))
    big = tmp_path / "big"
    for c in ("a", "b"):
        for i in range(10):
            (big / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16), i * 20, np.uint8)).save(big / c / f"{i}.png")
    _refused(adapter, _spec(big), r"data.source: the images are 16x16 with 1 channel\(s\); the model's "
             r"UNet2DModel takes 8x8 with 1: resize")  # fmt: skip
    rgb = tmp_path / "rgb"
    for c in ("a", "b"):
        for i in range(10):
            (rgb / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(rgb / c / f"{i}.png")
    _refused(adapter, _spec(rgb), r"8x8 with 3 channel\(s\); the model's UNet2DModel takes 8x8 with 1")


def test_more_classes_than_the_embedding_holds_are_refused(
    tmp_path: Path, teacher_dir: Path, digit_folder: Path
) -> None:
    adapter = DiffusersAdapter()
    adapter.load(str(_teacher_folder(tmp_path / "t", num_class_embeds=3)))  # 2 classes + the null slot
    _refused(adapter, _spec(digit_folder), r"3 class subfolders, more than the 2 classes the model's class "
             "embedding holds")  # fmt: skip
    eleven = _digit_folder(tmp_path / "eleven", classes=tuple(range(10)), per_class=4)
    _digit_folder(eleven / "extra", classes=(0,), per_class=4)  # an 11th class folder (nested images)
    adapter.load(str(teacher_dir))  # 11 embeddings: 10 classes, then the null label 10
    _refused(adapter, _spec(eleven, calibration_samples=1), r"11 class subfolders, more than the 10 classes")


def test_captions_per_split_sources_and_tiny_folders_are_refused(digit_folder: Path, tmp_path: Path) -> None:
    adapter = DiffusersAdapter()
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(pairs / f"{i}.png")
        (pairs / f"{i}.txt").write_text(f"caption {i}")
    _refused(adapter, _spec(pairs), "^data.source: captions need a text-conditional pipeline; class subfolders "
             "work with the class-conditional ones$")  # fmt: skip
    _refused(adapter, _spec(digit_folder, eval_source=str(digit_folder)), "data.eval_source: the diffusers adapter "
             "reads one image folder from data.source")  # fmt: skip
    _refused(adapter, _spec(digit_folder, calibration_samples=500), r"train \+ calibration images \(80% of 90 by "
             r"hash\), the recipe asks for 500 calibration images: lower data.calibration_samples")  # fmt: skip
    one = _digit_folder(tmp_path / "one", classes=(4,), per_class=5)
    _refused(adapter, _spec(one, calibration_samples=1), "one class subfolder .*needs at least 2 classes")
    few = _digit_folder(tmp_path / "few", classes=(1, 2), per_class=2)
    _refused(
        adapter, _spec(few, calibration_samples=1), "held-out images .*needs at least 2: give more images"
    )


def test_what_each_denoiser_takes_and_text_models_refuse_class_folders(digit_folder: Path) -> None:
    from compressor.adapters.diffusion.adapter import ModelFit
    from tests.compressor.adapters.test_diffusion import tiny_dit, tiny_text_teacher

    assert ModelFit.of(tiny_teacher()) == ModelFit(1, 8, 10, "UNet2DModel")  # 11 embeddings, null = 10
    assert ModelFit.of(tiny_dit()) == ModelFit(1, 8, 10, "DiTTransformer2DModel")
    for kind, name in (("text_unet", "UNet2DConditionModel"), ("mmdit_flow", "SD3Transformer2DModel")):
        fit = ModelFit.of(tiny_text_teacher(kind))
        assert fit == ModelFit(1, 8, None, name)
        adapter = DiffusersAdapter()
        adapter._fit = fit  # what load() records for such a teacher folder
        _refused(adapter, _spec(digit_folder), "class subfolders need a class-conditional pipeline .*this "
                 f"{name} is text-conditional")  # fmt: skip


def test_recipe_compiles_a_tiny_pipeline_on_an_image_folder(
    teacher_dir: Path, digit_folder: Path, tmp_path: Path
) -> None:
    from compressor.app.compile import compile_recipe
    from compressor.recipe import parse_recipe

    recipe = {
        "name": "images-int8",
        "model": {"source": str(teacher_dir), "adapter": "diffusers"},
        "target": "cpu",
        "data": {
            "source": str(digit_folder),
            "calibration_samples": 16,
            "eval_samples": 12,
            "batch_size": 16,
        },
        "passes": [
            {"pass": "scheduler", "solver": "dpmsolver++", "steps": 2},
            {"pass": "quantize", "method": "int8"},
        ],
        "exports": [{"format": "diffusers-pipeline"}],
        "evaluation": {"run_bench": False},
    }
    adapter = DiffusersAdapter()
    manifest = compile_recipe(parse_recipe(recipe, "images.yaml"), tmp_path / "bundle", adapter=adapter)
    idx = image_splits(read_image_folder(digit_folder))
    assert manifest["data"]["source"] == str(digit_folder)
    assert manifest["data"]["eval"] == len(idx["eval"]) and manifest["data"]["classes"][0] == "digit-0"
    assert [p["metrics"]["steps"] for p in manifest["passes"]] == [4.0, 2.0, 2.0]
    assert manifest["passes"][-1]["details"]["quantized_layers"] > 0
    assert all(np.isfinite(p["metrics"]["fd"]) for p in manifest["passes"])
    assert adapter.scorer().real_features.shape[0] == len(idx["eval"])  # scored against the folder
    assert manifest["verification"]["onnx"]["sqnr_db"] > 30
