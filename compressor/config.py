"""Strict conversion of plain YAML data into frozen, typed config dataclasses.

Every pass declares its options as a frozen dataclass whose fields carry a ``help``
string in their metadata. ``from_dict`` builds one from YAML data and rejects unknown
keys, missing required keys and values of the wrong type, naming the full path of the
bad key (``passes[2].bits: 3 is not one of 4, 8``) so the user can fix the recipe
without reading a traceback.

Every value is bounded, so no recipe can ask for centuries of training or gigabytes of
lists: an integer option lies within ``±INT_MAX`` unless its ``option(...)`` gives other
bounds (``ge``, ``gt``, ``le``; the sign of a count is its config's ``validate``), a list holds at most ``MAX_ITEMS`` entries, and a float is
finite (NaN would silently disable every comparison it takes part in). The bounds are
part of each option's help (``compressor passes --verbose``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from compressor.errors import RecipeError

T = TypeVar("T")


INT_MAX = 1_000_000
"""The default upper bound of an integer option: above any count a real run needs (steps,
samples, batch sizes, layers, grid points), far below one that would run for days."""

MAX_ITEMS = 1024
"""The default most entries of a list option (batch sizes, lengths, layer patterns)."""

SERVING_BATCH_SIZES: tuple[int, ...] = (1, 32)
"""The batch sizes a recipe serves and benchmarks unless it says (``evaluation.bench``); the
exporters size serving configs by them (``compressor.exporters.base.ExportContext``)."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,  # noqa: A002
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    max_items: int = MAX_ITEMS,
    patterns: bool = False,
    **kwargs: Any,
) -> Any:
    """A config field with its description (shown by `compressor passes --verbose`).

    ``ge`` / ``gt`` / ``le`` bound a number (each item of a list of numbers); an integer
    without them lies within ``±INT_MAX``. ``patterns``: the strings are module-name patterns
    (globs, or ``re:`` regular expressions, which must compile)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) default for config fields")
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "max_items": max_items, "patterns": patterns}
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def _bounds(tp: Any, meta: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(ge, gt, le) of a value of type ``tp`` under a field's metadata (ints get the default cap)."""
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if tp is int:
        if ge is None and gt is None:
            ge = -INT_MAX  # the sign is the option's own validate()'s business
        if le is None:
            le = INT_MAX
    return ge, gt, le


def _number(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1000 else f"{x:g}"


def _range_text(ge: float | None, gt: float | None, le: float | None, hide_default_floor: bool = True) -> str:
    if ge == -INT_MAX and hide_default_floor:  # the help leaves the sign to the option's validate()
        ge = None
    if ge is not None and le is not None:
        return f"{_number(ge)} to {_number(le)}"
    parts = []
    if ge is not None:
        parts.append(f"at least {_number(ge)}")
    if gt is not None:
        parts.append(f"above {_number(gt)}")
    if le is not None:
        parts.append(f"at most {_number(le)}")
    return ", ".join(parts)


def _check_range(value: float, tp: Any, meta: Mapping[str, Any], path: str) -> None:
    ge, gt, le = _bounds(tp, meta)
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        allowed = _range_text(ge, gt, le, hide_default_floor=value >= -INT_MAX)
        raise RecipeError(f"{path}: {show(value)} is out of range (allowed: {allowed})")


def _check_pattern(value: str, path: str) -> None:
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as e:
            raise RecipeError(
                f"{path}: {show(value)} is not a valid regular expression ({e}); fix it or use a glob without re:"
            ) from None


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages about user input."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a number too long to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_key(key: Any) -> str:
    """A mapping key for a message path: a string as it is (cut to 60 characters), else its repr."""
    return key[:60] if isinstance(key, str) else show(key)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, meta: Mapping[str, Any] | None = None) -> Any:
    meta = meta or {}
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            shown = ", ".join(str(c) for c in choices)
            raise RecipeError(f"{path}: {show(value)} is not one of {shown}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"{path}: null is not allowed here (expected {_describe(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, meta)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path}: {show(value)} is not {_describe(tp)}")
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected {_describe(tp)}, got {type(value).__name__} {show(value)}")
        limit = meta.get("max_items", MAX_ITEMS)
        if len(value) > limit:
            raise RecipeError(f"{path}: {len(value)} entries; at most {limit} are allowed")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{path}[{i}]", meta) for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {show(value)}")
        _check_range(value, int, meta, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise RecipeError(f"{path}: {show(value)} is not a finite number")
        _check_range(number, float, meta, path)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {show(value)}")
        if meta.get("patterns"):
            _check_pattern(value, path)
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{path}: expected a mapping, got {show(value)}")
        return dict(value)
    raise TypeError(f"config type {tp!r} at {path} is not supported by compressor.config")


def from_dict(cls: type[T], data: Any, path: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``; errors name ``path.key``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: expected a mapping of options, got {type(data).__name__} {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(fields) or "(none)"
        raise RecipeError(f"{path}.{show_key(unknown[0])}: unknown key; allowed keys here: {known}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{sub}: required key is missing ({f.metadata.get('help', '')})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The YAML/JSON-ready form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _numeric_types(tp: Any) -> list[Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType, tuple, list):
        return [t for a in get_args(tp) if a is not Ellipsis for t in _numeric_types(a)]
    return [tp] if tp in (int, float) else []


def describe_bounds(tp: Any, meta: Mapping[str, Any]) -> str:
    """The allowed values of an option's numbers, e.g. ``integer 0 to 1,000,000; number above 0``."""
    parts = []
    for t in dict.fromkeys(_numeric_types(tp)):
        rng = _range_text(*_bounds(t, meta))
        kind = "integer" if t is int else "number (finite)"
        parts.append(f"{kind} {rng}" if rng else kind)
    return "; ".join(parts)


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option of a config class; the help ends with the
    option's bounds (``[integer 1 to 1,000,000]``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = "required" if f.default is dataclasses.MISSING else repr(f.default)
        help_ = f.metadata.get("help", "")
        bounds = describe_bounds(hints[f.name], f.metadata)
        if bounds:
            help_ = f"{help_} [{bounds}]" if help_ else f"[{bounds}]"
        rows.append((f.name, _describe(hints[f.name]), default, help_))
    return rows


def config_classes(config: Any) -> list[type]:
    """The config dataclass(es) behind a registered ``Config``: itself, or each member when it is
    a union of one config per scheme (``quantize``: int8 | fp8 | int4)."""
    if isinstance(config, type) and dataclasses.is_dataclass(config):
        return [config]
    members = [c for c in get_args(config) if isinstance(c, type) and dataclasses.is_dataclass(c)]
    if not members:
        raise TypeError(f"{config!r} is neither a config dataclass nor a union of them")
    return members
