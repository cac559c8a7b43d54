"""Image folders: both layouts read, every bad folder is one line naming it, hashed splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.data import split_of
from compressor.errors import DataError
from compressor.sources import image_splits, read_image_folder

Image = pytest.importorskip("PIL.Image")


def _png(path: Path, value: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)  # uint8: L, RGB by shape


def _raises(match: str, path: Path) -> str:
    with pytest.raises(DataError, match=match) as e:
        read_image_folder(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)
    return str(e.value)


def test_class_subfolders_read_sorted_with_labels(tmp_path: Path) -> None:
    for cls, n in (("zebra", 2), ("ant", 3)):
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png", 10 * n + i)
    _png(tmp_path / "ant" / "more" / "deep.png", 99)  # nested images belong to their class
    (tmp_path / ".cache").mkdir()
    _png(tmp_path / ".cache" / "x.png", 1)  # hidden: skipped
    (tmp_path / "README.md").write_text("not an image")  # other files at the top: skipped
    s = read_image_folder(tmp_path)
    assert s.classes == ("ant", "zebra") and s.captions is None
    assert s.names == (
        "ant/0.png",
        "ant/1.png",
        "ant/2.png",
        "ant/more/deep.png",
        "zebra/0.png",
        "zebra/1.png",
    )
    assert s.labels is not None and s.labels.tolist() == [0, 0, 0, 0, 1, 1] and s.labels.dtype == np.int64
    assert s.images.shape == (6, 8, 8) and s.images.dtype == np.uint8 and s.channels == 1
    want = np.asarray(Image.open(tmp_path / "zebra" / "1.png"))
    np.testing.assert_array_equal(s.images[5], want)  # pixels round-trip exactly
    assert not s.images.flags.writeable


def test_caption_pairs_read_with_rgb(tmp_path: Path) -> None:
    for i, name in enumerate(("b", "a")):
        _png(tmp_path / f"{name}.png", i, size=(6, 4), mode="RGB")
        (tmp_path / f"{name}.txt").write_text(f"  a photo of {name}\n", encoding="utf-8")
    s = read_image_folder(tmp_path)
    assert s.names == ("a.png", "b.png") and s.captions == ("a photo of a", "a photo of b")
    assert s.labels is None and s.classes == () and s.images.shape == (2, 4, 6, 3) and s.channels == 3


def test_palette_and_one_bit_images_are_converted(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 255, np.uint8)).convert("1").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    _png(tmp_path / "b.png", 3)
    (tmp_path / "b.txt").write_text("y")
    s = read_image_folder(tmp_path)
    assert s.images.shape == (2, 8, 8) and set(np.unique(s.images[0])) == {255}


def test_missing_empty_and_file_sources(tmp_path: Path) -> None:
    _raises("does not exist; give an image folder", tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    _raises("is a file, not an image folder", tmp_path / "f.png")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    _raises("holds no images", tmp_path / "empty")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "ok.png", 1)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _raises(r"cannot read image 'a/broken.png'", tmp_path)


def test_a_gif_renamed_png_is_not_decoded(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png", format="GIF")
    (tmp_path / "x.txt").write_text("caption")
    _raises(r"cannot read image 'x.png'", tmp_path)  # only the PNG / JPEG / BMP / WEBP decoders run


def test_mixed_sizes_and_modes_name_two_images(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", 1)
    _png(tmp_path / "b" / "2.png", 2, size=(16, 16))
    msg = _raises(r"images differ in size or mode: 'a/1.png' is 8x8 L, 'b/2.png' is 16x16 L", tmp_path)
    assert "convert them to one size and mode" in msg
    modes = tmp_path / "modes"
    _png(modes / "a" / "1.png", 1)
    _png(modes / "b" / "2.png", 2, mode="RGB")
    _raises(r"'a/1.png' is 8x8 L, 'b/2.png' is 8x8 RGB", modes)


def test_unsupported_mode_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "deep.png")  # 16-bit grayscale
    (tmp_path / "deep.txt").write_text("c")
    _raises(r"image 'deep.png' has mode I;16; save it as 8-bit grayscale or RGB", tmp_path)


def test_caption_layout_errors(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 1)
    _raises(r"image 'a.png' has no caption 'a.txt'; add one, or put the images in class subfolders", tmp_path)
    (tmp_path / "a.txt").write_text("   ")
    _raises(r"caption 'a.txt' is empty", tmp_path)
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    _raises(r"caption 'a.txt' is not UTF-8", tmp_path)


def test_mixed_layouts_and_empty_class_folders_are_refused(tmp_path: Path) -> None:
    _png(tmp_path / "top.png", 1)
    (tmp_path / "top.txt").write_text("c")
    _png(tmp_path / "cls" / "1.png", 2)
    _raises(
        r"mixes images at its top \('top.png'\) with class subfolders \('cls'\); use one layout", tmp_path
    )
    other = tmp_path / "other"
    _png(other / "a" / "1.png", 1)
    (other / "b").mkdir()
    _raises(r"class folder 'b' holds no images", other)


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "outside.png", 1)
    root = tmp_path / "root"
    _png(root / "a" / "1.png", 2)
    (root / "a" / "2.png").symlink_to(tmp_path / "outside.png")
    _raises(r"'a/2.png' points outside the folder", root)


def _many(tmp_path: Path, n: int = 200) -> Path:
    for i in range(n):
        _png(tmp_path / f"c{i % 3}" / f"{i:03d}.png", i)
    return tmp_path


def test_image_splits_are_deterministic_disjoint_and_follow_the_hash_rule(tmp_path: Path) -> None:
    s = read_image_folder(_many(tmp_path))
    splits = image_splits(s)
    assert {k: v.tolist() for k, v in splits.items()} == {
        k: v.tolist() for k, v in image_splits(read_image_folder(tmp_path)).items()
    }
    everything = np.concatenate(list(splits.values()))
    assert sorted(everything.tolist()) == list(range(200))  # disjoint and complete
    for name, idx in splits.items():
        assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
        assert all(split_of(f"{s.names[i]}\0{s.digests[i]}") == name for i in idx)
    assert 20 <= len(splits["eval"]) <= 60 and 8 <= len(splits["calibration"]) <= 35


def test_a_copy_of_a_held_out_image_is_dropped_from_train(tmp_path: Path) -> None:
    s = read_image_folder(_many(tmp_path, 60))
    held = s.names[int(image_splits(s)["eval"][0])]
    data = (tmp_path / held).read_bytes()
    for k in range(40):  # copies under other names: most hash outside eval
        (tmp_path / "c0" / f"copy{k}.png").write_bytes(data)
    s2 = read_image_folder(tmp_path)
    splits = image_splits(s2)
    held_digest = s2.digests[s2.names.index(held)]
    for name in ("calibration", "train"):
        assert all(s2.digests[i] != held_digest for i in splits[name])
    assert sum(s2.digests[i] == held_digest for i in splits["eval"]) >= 1
    assert len(np.concatenate(list(splits.values()))) < len(s2.names)  # copies dropped, not moved
