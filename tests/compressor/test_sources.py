"""Your own text data: every format round-trips, every bad input is one line, splits stay disjoint."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from compressor.data import split_of
from compressor.errors import DataError
from compressor.recipe import DataSpec
from compressor.sources import read_texts, user_text_splits

TEXTS = [f"example sentence number {i} about compression" for i in range(60)]


def _spec(**kw: Any) -> DataSpec:
    return DataSpec(**{"calibration_samples": 1, "eval_samples": 1, "train_samples": 8, **kw})


def _write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def _write_arrow_stream(path: Path, columns: dict[str, list[Any]], batch_rows: int = 7) -> None:
    """An Arrow IPC stream the way datasets' ArrowWriter writes one (several record batches)."""
    pa = pytest.importorskip("pyarrow")
    table = pa.table(columns)
    meta = {b"huggingface": json.dumps({"info": {"features": {}}}).encode()}
    schema = table.schema.with_metadata(meta)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch.replace_schema_metadata(meta))


def _write_saved_dataset(folder: Path, columns: dict[str, list[Any]], shards: int = 1) -> Path:
    """A folder as ``Dataset.save_to_disk`` writes it: shards, state.json, dataset_info.json."""
    folder.mkdir(parents=True)
    n = len(next(iter(columns.values())))
    files = []
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        lo, hi = s * n // shards, (s + 1) * n // shards
        _write_arrow_stream(folder / name, {k: v[lo:hi] for k, v in columns.items()})
        files.append({"filename": name})
    (folder / "state.json").write_text(
        json.dumps({"_data_files": files, "_fingerprint": "x", "_split": None})
    )
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def _save_to_disk(folder: Path, columns: dict[str, list[Any]]) -> Path:
    """A real ``datasets`` folder when datasets is installed, else the same layout written here."""
    try:
        import datasets
    except ImportError:
        return _write_saved_dataset(folder, columns, shards=2)
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder), num_shards=2)
    return folder


# ---- formats


def test_txt_skips_blank_lines_strips_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"\xef\xbb\xbf  first line \n\n\t\nsecond\r\n  third  ")
    assert read_texts(path) == ["first line", "second", "third"]


def test_jsonl_reads_the_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS[:5])] + [{"text": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_texts(path) == TEXTS[:5]
    body = [{"body": t} for t in TEXTS[:3]]
    path.write_text("\n".join(json.dumps(r) for r in body))
    assert read_texts(path, field="body") == TEXTS[:3]


def test_csv_reads_the_field_with_quoted_commas_and_newlines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    texts = ["plain", "with, a comma", 'with "quotes"', "two\nlines"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(texts))
    assert read_texts(path) == texts


def test_parquet_reads_the_field(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"label": list(range(5)), "text": TEXTS[:5]}), path)
    assert read_texts(path) == TEXTS[:5]
    pq.write_table(pa.table({"text": pa.array(TEXTS[:3]).dictionary_encode()}), path)
    assert read_texts(path) == TEXTS[:3]


def test_saved_dataset_folder_reads_every_shard_in_order(tmp_path: Path) -> None:
    folder = _save_to_disk(tmp_path / "ds", {"text": TEXTS[:20], "label": list(range(20))})
    assert read_texts(folder) == TEXTS[:20]


def test_dataset_dict_folder_reads_every_split(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    _write_saved_dataset(root / "train", {"text": TEXTS[:10]})
    _write_saved_dataset(root / "test", {"text": TEXTS[10:15]})
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_texts(root) == TEXTS[:15]
    assert read_texts(root / "test") == TEXTS[10:15]  # one split: point at its folder


# ---- errors: one line naming the path and what to do


def _raises(match: str, path: Path, **kw: Any) -> str:
    with pytest.raises(DataError, match=match) as e:
        read_texts(path, **kw)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    _raises("does not exist; give a .txt / .jsonl", tmp_path / "nope.txt")
    (tmp_path / "d.xlsx").write_text("x")
    _raises("unknown file type '.xlsx'", tmp_path / "d.xlsx")


def test_empty_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_text("\n  \n")
    _raises("holds no text", tmp_path / "e.txt")
    (tmp_path / "e.csv").write_text("")
    _raises("holds no text", tmp_path / "e.csv")


def test_missing_field_lists_the_fields_that_exist(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text('{"body": "x", "id": 1}\n')
    _raises(r"line 1 has no 'text' key \(its keys: 'body', 'id'\); set data.field", tmp_path / "d.jsonl")
    (tmp_path / "d.csv").write_text("body,id\nx,1\n")
    _raises(r"no 'text' column \(columns: 'body', 'id'\)", tmp_path / "d.csv")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    _raises(r"no 'text' column \(columns: 'body'\)", tmp_path / "d.parquet")
    _write_saved_dataset(tmp_path / "ds", {"body": ["x"]})
    _raises(r"no 'text' column \(columns: 'body'\)", tmp_path / "ds")


def test_undecodable_rows_are_named_by_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "broken\n')
    _raises("line 2 is not valid JSON", tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "ok"}\n["text"]\n')
    _raises("line 2 is a JSON list, not an object", tmp_path / "list.jsonl")
    (tmp_path / "num.jsonl").write_text('{"text": "ok"}\n\n{"text": 3}\n')
    _raises("line 3 holds int in 'text', not text", tmp_path / "num.jsonl")
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    _raises("line 1 holds null", tmp_path / "null.jsonl")
    (tmp_path / "latin1.txt").write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    _raises("line 3 is not UTF-8 text", tmp_path / "latin1.txt")
    (tmp_path / "latin1.csv").write_bytes(b"text\nfine\ncaf\xe9\n")
    _raises("line 3 is not UTF-8 text", tmp_path / "latin1.csv")
    (tmp_path / "short.csv").write_text("id,text\n1,ok\n2\n")
    _raises("line 3 has no value in column 'text'", tmp_path / "short.csv")


def test_non_text_and_null_columns_are_refused(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    _raises("column 'text' holds int64, not text", tmp_path / "n.parquet")
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "null.parquet")
    _raises(r"row 2 has no value \(null\)", tmp_path / "null.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    _raises("not a readable Parquet file", tmp_path / "junk.parquet")
    folder = _write_saved_dataset(tmp_path / "ds", {"text": [f"t{i}" for i in range(9)] + [None]})
    _raises("row 10 has no value", folder)  # rows count across record batches
    (folder / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    _raises("not an Arrow stream", folder)


def test_dataset_folder_metadata_cannot_point_outside(tmp_path: Path) -> None:
    folder = _write_saved_dataset(tmp_path / "ds", {"text": ["a"]})
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}))
    _raises("not a file name in the folder", folder)
    root = tmp_path / "dd"
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": [".."]}))
    _raises("not a file name in the folder", root)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    _raises("split folder 'train' is missing", root)
    empty = tmp_path / "plain"
    empty.mkdir()
    _raises("a folder without state.json", empty)


def test_without_pyarrow_the_install_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"x")
    _write_saved_dataset(tmp_path / "ds", {"text": ["a"]})
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    _raises(r"needs pyarrow: pip install 'compressor\[data\]'", tmp_path / "d.parquet")
    _raises(r"needs pyarrow: pip install 'compressor\[data\]'", tmp_path / "ds")


def test_errors_name_the_recipe_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^data.eval_source: .*does not exist"):
        read_texts(tmp_path / "x.txt", what="data.eval_source")


# ---- splits


def test_no_source_means_the_corpus() -> None:
    assert user_text_splits(DataSpec()) is None


def test_source_is_hash_split_deterministic_disjoint_and_deduplicated(tmp_path: Path) -> None:
    texts = [f"sentence {i} of the user's own corpus" for i in range(400)]
    path = _write_txt(tmp_path / "d.txt", texts + texts[:50])  # duplicates count once
    splits = user_text_splits(_spec(source=str(path)))
    assert splits is not None and splits == user_text_splits(_spec(source=str(path)))
    parts = {"calibration": splits.calibration, "train": splits.train, "eval": splits.eval}
    assert sum(len(p) for p in parts.values()) == 400
    for name, part in parts.items():
        assert all(split_of(t) == name for t in part)
        assert list(part) == [t for t in texts if split_of(t) == name]  # file order kept
    assert not set(splits.eval) & (set(splits.calibration) | set(splits.train))
    assert 40 <= len(splits.eval) <= 120 and 15 <= len(splits.calibration) <= 65  # ~20 % / ~10 %


def test_per_split_source_replaces_its_split_and_drops_the_hashed_ones(tmp_path: Path) -> None:
    texts = [f"base text {i}" for i in range(300)]
    base = _write_txt(tmp_path / "base.txt", texts)
    own_cal = [f"calibration text {i}" for i in range(12)]
    cal = _write_txt(tmp_path / "cal.txt", own_cal)
    splits = user_text_splits(_spec(source=str(base), calibration_source=str(cal)))
    assert splits is not None
    assert list(splits.calibration) == own_cal
    assert list(splits.train) == [t for t in texts if split_of(t) == "train"]  # not moved into train
    assert list(splits.eval) == [t for t in texts if split_of(t) == "eval"]


def test_held_out_never_leaks_into_calibration_or_train(tmp_path: Path) -> None:
    texts = [f"base text {i}" for i in range(300)]
    base = _write_txt(tmp_path / "base.txt", texts)
    train_hashed = [t for t in texts if split_of(t) == "train"]
    held_out = train_hashed[:30] + [f"fresh eval {i}" for i in range(5)]
    ev = _write_txt(tmp_path / "eval.txt", held_out)
    cal = _write_txt(tmp_path / "cal.txt", held_out[:3] + ["only calibration"])
    splits = user_text_splits(_spec(source=str(base), eval_source=str(ev), calibration_source=str(cal)))
    assert splits is not None
    assert list(splits.eval) == held_out  # the held-out stays whole
    assert list(splits.calibration) == ["only calibration"]
    assert list(splits.train) == train_hashed[30:]
    assert not any(split_of(t) == "eval" and t in texts for t in splits.train + splits.calibration)


def test_too_few_examples_name_the_split_and_the_option(tmp_path: Path) -> None:
    texts = [f"sentence {i} of the user's own corpus" for i in range(400)]
    path = str(_write_txt(tmp_path / "d.txt", texts))
    n_cal = sum(split_of(t) == "calibration" for t in texts)
    n_eval = sum(split_of(t) == "eval" for t in texts)
    with pytest.raises(DataError) as e:
        user_text_splits(_spec(source=path, calibration_samples=128))
    assert str(e.value) == (
        f"data.source: {n_cal} calibration examples (10% of 400 by hash), the recipe asks for 128: "
        "lower data.calibration_samples or give more data"
    )
    with pytest.raises(DataError, match=rf"data.source: {n_eval} eval examples \(20% of 400 by hash\).*512"):
        user_text_splits(_spec(source=path, eval_samples=512))
    own = str(_write_txt(tmp_path / "own.txt", ["a", "b"]))
    with pytest.raises(DataError, match="^data.eval_source: 2 eval examples, the recipe asks for 3"):
        user_text_splits(_spec(source=path, eval_source=own, eval_samples=3))
    # train may hold fewer than asked
    assert user_text_splits(_spec(source=path, train_samples=100_000)) is not None


def test_empty_splits_are_refused(tmp_path: Path) -> None:
    cal = str(_write_txt(tmp_path / "cal.txt", ["x", "y"]))
    with pytest.raises(DataError, match="^data: no eval examples; set data.source or data.eval_source$"):
        user_text_splits(_spec(calibration_source=cal))
    ev = str(_write_txt(tmp_path / "ev.txt", ["x", "z"]))
    with pytest.raises(DataError, match="data.calibration_source: no calibration examples after dropping 1"):
        user_text_splits(
            _spec(calibration_source=str(_write_txt(tmp_path / "c1.txt", ["x"])), eval_source=ev)
        )
    splits = user_text_splits(_spec(calibration_source=cal, eval_source=ev, train_samples=0))
    assert splits is not None and splits.train == () and list(splits.calibration) == ["y"]
    with pytest.raises(
        DataError,
        match="^data: no train examples; set data.source or data.train_source, or set data.train_samples: 0",
    ):
        user_text_splits(_spec(calibration_source=cal, eval_source=ev), require_train=True)
    assert user_text_splits(
        _spec(calibration_source=cal, eval_source=ev, train_samples=0), require_train=True
    )
