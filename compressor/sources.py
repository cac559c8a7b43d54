"""Your own data (the recipe's ``data.source``): text files, datasets folders, image folders.

Text comes from one entry point, ``read_texts``: a ``.txt`` file (one example per line), a
``.jsonl`` / ``.csv`` / ``.parquet`` file (the ``field`` column), or a folder written by
Hugging Face datasets' ``save_to_disk`` (its ``*.arrow`` files are Arrow IPC *streams*, read
with pyarrow; a ``DatasetDict`` folder reads every split in ``dataset_dict.json``'s order: to
use one split, point the source at its subfolder). The data is only ever parsed: nothing in
it is imported, executed or unpickled. Examples are stripped, empty ones dropped, order kept.

``user_text_splits`` splits them the way the shipped corpus is split (``compressor.data``):
by a hash of each text, 20 % held-out eval, 10 % calibration, 70 % train, so an example
always lands in the same split. A per-split source (``eval_source`` ...) replaces that split;
the ``source`` examples that hash into it are then dropped, not moved, so nothing that would
have been held out is trained on. The held-out split stays whole: any text it shares with
calibration or train is dropped from those.

Image folders for the diffusers adapter (``read_image_folder``, ``image_splits``, ``ImageSet``)
are defined in ``compressor.image_folder`` and importable from here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from compressor.data import TextSplits, split_of
from compressor.errors import DataError
from compressor.image_folder import ImageSet, image_splits, read_image_folder

__all__ = ["ImageSet", "image_splits", "read_image_folder", "read_texts", "user_text_splits"]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
SPLITS = ("calibration", "train", "eval")
SHARE = {"calibration": "10%", "train": "70%", "eval": "20%"}  # compressor.data.split_of
_KINDS = "a .txt / .jsonl / .csv / .parquet file or a folder written by datasets' save_to_disk"
_INSTALL_PYARROW = "pip install 'compressor[data]'"


def _fields(names: Iterable[str]) -> str:
    listed = [repr(n) for n in names]
    return ", ".join(listed) if listed else "none"


def _decode(raw: bytes, where: str) -> str:
    """UTF-8 text (a leading BOM dropped); a bad byte is named by its line number."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{where}: line {line} is not UTF-8 text; save the file as UTF-8") from None


def _read_txt(path: Path, where: str) -> list[str]:
    return _decode(path.read_bytes(), where).splitlines()


def _read_jsonl(path: Path, field: str, where: str) -> list[str]:
    out = []
    for number, line in enumerate(_decode(path.read_bytes(), where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise DataError(f"{where}: line {number} is JSON nested too deeply to read") from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: line {number} is not valid JSON ({e.msg}); write one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: line {number} is a JSON {type(row).__name__}, not an object with a {field!r} key"
            )
        if field not in row:
            raise DataError(
                f"{where}: line {number} has no {field!r} key (its keys: {_fields(row)}); set data.field to the key "
                "that holds the text"
            )
        out.append(_text_value(row[field], where, f"line {number}", field))
    return out


def _text_value(value: Any, where: str, row: str, field: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: {row} holds {got} in {field!r}, not text; fix that row or drop it")
    return value


def _read_csv(path: Path, field: str, where: str) -> list[str]:
    reader = csv.reader(io.StringIO(_decode(path.read_bytes(), where), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        if field not in header:
            raise DataError(
                f"{where}: the header row has no {field!r} column (columns: {_fields(header)}); set data.field "
                "to the column that holds the text"
            )
        col = header.index(field)
        out = []
        for row in reader:
            if not row:  # a blank line
                continue
            if col >= len(row):
                raise DataError(f"{where}: line {reader.line_num} has no value in column {field!r}")
            out.append(row[col])
        return out
    except csv.Error as e:
        raise DataError(f"{where}: line {reader.line_num} is not valid CSV ({e})") from None


def _pyarrow(where: str) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{where}: reading it needs pyarrow: {_INSTALL_PYARROW}") from None
    return pyarrow


def _column_texts(pa: Any, table: Any, field: str, where: str, first_row: int = 1) -> list[str]:
    """The ``field`` column of an Arrow table or record batch as Python strings."""
    if field not in table.schema.names:
        raise DataError(
            f"{where}: no {field!r} column (columns: {_fields(table.schema.names)}); set data.field to the "
            "column that holds the text"
        )
    column = table.column(field)
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise DataError(
            f"{where}: column {field!r} holds {column.type}, not text; set data.field to a text column"
        )
    values = column.to_pylist()
    for i, value in enumerate(values):
        if value is None:
            raise DataError(f"{where}: row {first_row + i} has no value (null) in {field!r}; fill or drop it")
    return values


def _read_parquet(path: Path, field: str, where: str) -> list[str]:
    pa = _pyarrow(where)
    try:
        names = pa.parquet.read_schema(path).names
        if field not in names:
            raise DataError(
                f"{where}: no {field!r} column (columns: {_fields(names)}); set data.field to the column that "
                "holds the text"
            )
        table = pa.parquet.read_table(path, columns=[field])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{where}: not a readable Parquet file ({' '.join(str(e).split())})") from None
    return _column_texts(pa, table, field, where)


def _inside(folder: Path, name: Any, where: str, what: str) -> Path:
    """``folder / name`` for a file name read from the folder's own metadata, kept inside it."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise DataError(
            f"{where}: names {what} {name!r}, not a file name in the folder; re-save the data set"
        )
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{where}: {what} {name!r} points outside the folder; re-save the data set")
    return path


def _json_file(path: Path, where: str) -> Any:
    try:
        return json.loads(_decode(path.read_bytes(), f"{where} ({path.name})"))
    except ValueError as e:
        raise DataError(f"{where}: {path.name} is not valid JSON ({e}); re-save the data set") from None


def _arrow_files(folder: Path, where: str) -> list[Path]:
    """The data files of one saved ``Dataset``, in ``state.json``'s order."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        files = sorted(folder.glob("*.arrow"))
        if not files:
            raise DataError(
                f"{where}: a folder without state.json, dataset_dict.json or *.arrow files; give {_KINDS}"
            )
        return files
    state = _json_file(state_path, where)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{where}: state.json lists no _data_files; re-save the data set with save_to_disk")
    return [_inside(folder, e.get("filename"), where, "data file") for e in entries]


def _read_arrow_stream(pa: Any, path: Path, field: str, where: str) -> list[str]:
    label = f"{where} ({path.name})"
    out: list[str] = []
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            if field not in reader.schema.names:
                _column_texts(pa, reader.schema.empty_table(), field, label)  # names the columns
            for batch in reader:
                out.extend(_column_texts(pa, batch, field, label, len(out) + 1))
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{label}: not an Arrow stream as datasets' save_to_disk writes ({' '.join(str(e).split())})"
        ) from None
    return out


def _read_datasets_folder(folder: Path, field: str, where: str) -> list[str]:
    pa = _pyarrow(where)
    dict_path = folder / "dataset_dict.json"
    if dict_path.is_file():
        info = _json_file(dict_path, where)
        splits = info.get("splits") if isinstance(info, dict) else None
        if not isinstance(splits, list) or not splits:
            raise DataError(
                f"{where}: dataset_dict.json lists no splits; re-save the data set with save_to_disk"
            )
        folders = [_inside(folder, s, where, "split") for s in splits]
        for sub in folders:
            if not sub.is_dir():
                raise DataError(f"{where}: split folder {sub.name!r} is missing; re-save the data set")
        log.info("%s: reading every split of the DatasetDict (%s)", where, ", ".join(s.name for s in folders))
    else:
        folders = [folder]
    out: list[str] = []
    for sub in folders:
        label = where if sub == folder else f"{where}, split {sub.name!r}"
        for path in _arrow_files(sub, label):
            out.extend(_read_arrow_stream(pa, path, field, label))
    return out


def read_texts(path: str | Path, field: str = "text", what: str = "data.source") -> list[str]:
    """Every example of a text source (see the module docstring), stripped, empty ones dropped,
    in file order. ``what`` names the recipe key in errors."""
    p = Path(path).expanduser()
    where = f"{what}: {str(path)!r}"
    if not p.exists():
        raise DataError(f"{where} does not exist; give {_KINDS}")
    try:
        if p.is_dir():
            raw = _read_datasets_folder(p, field, where)
        else:
            suffix = p.suffix.lower()
            if suffix not in TEXT_SUFFIXES:
                raise DataError(f"{where}: unknown file type {p.suffix or '(none)'!r}; give {_KINDS}")
            if suffix == ".txt":
                raw = _read_txt(p, where)
            elif suffix == ".jsonl":
                raw = _read_jsonl(p, field, where)
            elif suffix == ".csv":
                raw = _read_csv(p, field, where)
            else:
                raw = _read_parquet(p, field, where)
    except OSError as e:
        raise DataError(f"{where}: cannot be read ({e.strerror or e})") from None
    texts = [t for t in (s.strip() for s in raw) if t]
    if not texts:
        raise DataError(f"{where} holds no text (empty, or every example blank); give a source with examples")
    return texts


def _unique(texts: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for t in texts:
        if t not in seen:
            seen.add(t)
            yield t


def _too_few(key: str, split: str, have: int, want: int, how: str, option: str) -> DataError:
    return DataError(
        f"{key}: {have} {split} examples{how}, the recipe asks for {want}: lower data.{option} or give more data"
    )


def user_text_splits(spec: Any, require_train: bool = False) -> TextSplits | None:
    """The calibration / train / held-out eval texts of the recipe's own data (``spec`` is a
    ``DataSpec``), or None when it names none (the shipped corpus is used then).

    Raises ``DataError`` when the calibration or eval split is empty or holds fewer examples
    than ``calibration_samples`` / ``eval_samples`` ask for; train may hold fewer than
    ``train_samples`` (distillation uses what there is), and is only required to be non-empty
    (when ``train_samples`` > 0) with ``require_train``.
    """
    per_split = {s: getattr(spec, f"{s}_source", None) for s in SPLITS}
    source = getattr(spec, "source", None)
    if source is None and all(v is None for v in per_split.values()):
        return None
    field = getattr(spec, "field", "text")
    base = list(_unique(read_texts(source, field, "data.source"))) if source is not None else []
    splits: dict[str, list[str]] = {}
    for name in SPLITS:
        own = per_split[name]
        if own is not None:
            splits[name] = list(_unique(read_texts(own, field, f"data.{name}_source")))
        else:
            splits[name] = [t for t in base if split_of(t) == name]
    held_out = set(splits["eval"])
    dropped: dict[str, int] = {}
    for name in ("calibration", "train"):
        kept = [t for t in splits[name] if t not in held_out]
        dropped[name] = len(splits[name]) - len(kept)
        splits[name] = kept
    if any(dropped.values()):
        log.info("dropped texts that are also held out: %s", dropped)

    def origin(name: str) -> tuple[str, str]:
        if per_split[name] is not None:
            return f"data.{name}_source", ""
        if source is None:
            return "data", ""
        return "data.source", f" ({SHARE[name]} of {len(base)} by hash)"

    for name, option in (("calibration", "calibration_samples"), ("eval", "eval_samples")):
        key, how = origin(name)
        if dropped.get(name):
            how += f" after dropping {dropped[name]} that are also held out"
        if not splits[name]:
            hint = f"set data.source or data.{name}_source" if key == "data" else "give more data"
            raise DataError(f"{key}: no {name} examples{how}; {hint}")
        want = int(getattr(spec, option))
        if len(splits[name]) < want:
            raise _too_few(key, name, len(splits[name]), want, how, option)
    if require_train and int(getattr(spec, "train_samples", 0)) > 0 and not splits["train"]:
        key, how = origin("train")
        hint = "set data.source or data.train_source" if key == "data" else "give more data"
        raise DataError(f"{key}: no train examples{how}; {hint}, or set data.train_samples: 0")
    log.info("user data: %s", {name: len(texts) for name, texts in splits.items()})
    return TextSplits(tuple(splits["calibration"]), tuple(splits["train"]), tuple(splits["eval"]))
