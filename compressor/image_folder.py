"""Image folders (the recipe's ``data.source`` for the diffusers adapter) and their hashed splits.

Two layouts, as the image tools people already use write them:

- class subfolders, ``root/<class>/<image>`` (torchvision's ``ImageFolder``): the classes are
  the subfolder names sorted, a label is its class's index;
- image + caption pairs, ``root/<name>.png`` beside ``root/<name>.txt`` (the caption, UTF-8).

Images are ``.png``, ``.jpg`` / ``.jpeg``, ``.bmp`` or ``.webp``, decoded by Pillow with only
those decoders enabled, all of one size and one mode (8-bit grayscale ``L``, ``LA``, ``RGB``
or ``RGBA``; 1-bit images become ``L``, palette images ``RGB`` / ``RGBA``). Hidden files and
folders are skipped; a file that resolves outside the folder (a symlink) is refused.

``image_splits`` assigns each image to held-out eval (20 %), calibration (10 %) or train
(70 %) by the text-split rule of ``compressor.data`` applied to the image's relative path and
the sha1 of its bytes, so an image keeps its split across runs and machines. A copy of a
held-out image under another name is dropped from calibration / train (the held-out split
stays whole).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor.data import split_of
from compressor.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # the only decoders Pillow may try
MODES = ("L", "LA", "RGB", "RGBA")
_LAYOUTS = "class subfolders (root/<class>/<image>) or image + .txt caption pairs (root/x.png + root/x.txt)"


@dataclass(frozen=True, eq=False)
class ImageSet:
    """The images of a folder, in file-name order (by class for class subfolders).

    ``images`` is uint8, (N, H, W) for grayscale or (N, H, W, C); ``labels`` (N,) int64 class
    indices into ``classes`` (class layout) or None; ``captions`` one per image (caption
    layout) or None; ``names`` the relative file paths; ``digests`` the sha1 of each file.
    """

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...]
    captions: tuple[str, ...] | None
    names: tuple[str, ...]
    digests: tuple[str, ...]

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__pycache__"


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and all(_visible(Path(part)) for part in p.relative_to(folder).parts)
    )


def _decode(pil: Any, raw: bytes, name: str, where: str) -> np.ndarray:
    try:
        with pil.open(io.BytesIO(raw), formats=_PIL_FORMATS) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            if im.mode not in MODES:
                raise DataError(
                    f"{where}: image {name!r} has mode {im.mode}; save it as 8-bit grayscale or RGB(A)"
                )
            return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, pil.DecompressionBombError) as e:
        raise DataError(
            f"{where}: cannot read image {name!r} ({' '.join(str(e).split())}); replace or remove it"
        ) from None


def _caption(image: Path, name: str, where: str) -> str:
    path = image.with_suffix(".txt")
    if not path.is_file():
        raise DataError(
            f"{where}: image {name!r} has no caption {path.name!r}; add one, or put the images in class "
            "subfolders"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}: caption {path.name!r} is not UTF-8 text; save it as UTF-8") from None
    if not text:
        raise DataError(f"{where}: caption {path.name!r} is empty; write the image's caption in it")
    return text


def _listing(root: Path, where: str) -> tuple[list[Path], tuple[str, ...], list[int] | None]:
    """The image files, the classes and each file's class index (None: the caption layout)."""
    entries = sorted(p for p in root.iterdir() if _visible(p))
    top = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    folders = {p.name: _images_in(p) for p in entries if p.is_dir()}
    with_images = [n for n, files in folders.items() if files]
    if top and with_images:
        raise DataError(
            f"{where}: mixes images at its top ({top[0].name!r}) with class subfolders ({with_images[0]!r}); "
            f"use one layout: {_LAYOUTS}"
        )
    if top:
        return top, (), None
    if not with_images:
        raise DataError(f"{where}: holds no images ({', '.join(IMAGE_SUFFIXES)}); use {_LAYOUTS}")
    empty = [n for n, files in folders.items() if not files]
    if empty:
        raise DataError(f"{where}: class folder {empty[0]!r} holds no images; add images or remove it")
    classes = tuple(sorted(folders))
    files = [f for c in classes for f in folders[c]]
    labels = [i for i, c in enumerate(classes) for _ in folders[c]]
    return files, classes, labels


def _describe(image: np.ndarray) -> str:
    h, w = image.shape[:2]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[1 if image.ndim == 2 else image.shape[2]]
    return f"{w}x{h} {mode}"


def read_image_folder(path: str | Path, what: str = "data.source") -> ImageSet:
    """Every image of a folder in one of the two layouts (see the module docstring)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with diffusers / matplotlib
        raise DataError(f"{what}: reading images needs Pillow: pip install 'compressor[diffusion]'") from None
    root = Path(path).expanduser()
    where = f"{what}: {str(path)!r}"
    if not root.exists():
        raise DataError(f"{where} does not exist; give an image folder: {_LAYOUTS}")
    if not root.is_dir():
        raise DataError(f"{where} is a file, not an image folder; give a folder: {_LAYOUTS}")
    files, classes, labels = _listing(root, where)
    inside = root.resolve()
    images: list[np.ndarray] = []
    names: list[str] = []
    digests: list[str] = []
    captions: list[str] = []
    for file in files:
        name = file.relative_to(root).as_posix()
        if not file.resolve().is_relative_to(inside):
            raise DataError(f"{where}: {name!r} points outside the folder; copy the image in instead")
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise DataError(f"{where}: cannot read image {name!r} ({e.strerror or e})") from None
        image = _decode(Image, raw, name, where)
        if images and image.shape != images[0].shape:
            raise DataError(
                f"{where}: images differ in size or mode: {names[0]!r} is {_describe(images[0])}, {name!r} is "
                f"{_describe(image)}; convert them to one size and mode"
            )
        if labels is None:
            captions.append(_caption(file, name, where))
        images.append(image)
        names.append(name)
        digests.append(hashlib.sha1(raw).hexdigest())
    stacked = np.stack(images)
    stacked.setflags(write=False)
    label_array = None if labels is None else np.asarray(labels, dtype=np.int64)
    if label_array is not None:
        label_array.setflags(write=False)
    return ImageSet(
        stacked,
        label_array,
        classes,
        tuple(captions) if labels is None else None,
        tuple(names),
        tuple(digests),
    )


def image_splits(image_set: ImageSet) -> dict[str, np.ndarray]:
    """Indices (int64, ascending) of the calibration, train and held-out eval images."""
    which = [split_of(f"{n}\0{d}") for n, d in zip(image_set.names, image_set.digests)]
    held_out = {d for d, s in zip(image_set.digests, which) if s == "eval"}
    out = {}
    for split in ("calibration", "train", "eval"):
        keep = [
            i
            for i, s in enumerate(which)
            if s == split and (split == "eval" or image_set.digests[i] not in held_out)
        ]
        out[split] = np.asarray(keep, dtype=np.int64)
    return out
