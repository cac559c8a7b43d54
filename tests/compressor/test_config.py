"""compressor.config: YAML data into frozen typed configs, strictly, with the path in each error.

Small frozen dataclasses stand for a pass's options; each case is the data handed to
``from_dict`` and the exact config or message expected."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from compressor.config import (
    INT_MAX,
    MAX_ITEMS,
    config_classes,
    describe_bounds,
    describe_fields,
    from_dict,
    option,
    show,
    show_key,
    to_dict,
)
from compressor.errors import RecipeError


@dataclass(frozen=True)
class Inner:
    steps: int = option(10, help="optimizer steps", ge=1)
    lr: float = option(1e-3, help="learning rate", gt=0.0, le=1.0)


@dataclass(frozen=True)
class Opts:
    bits: Literal[4, 8] = option(8, help="weight bits")
    scheme: Literal["rtn", "gptq"] = option("rtn", help="algorithm")
    count: int = option(3, help="a count")
    alpha: float = option(0.5, help="migration strength", ge=0.0, le=1.0)
    enabled: bool = option(False, help="on or off")
    targets: tuple[str, ...] = option(("*",), help="layer patterns", patterns=True)
    sizes: tuple[int, ...] = option((1, 32), help="batch sizes", ge=1, max_items=3)
    group: int | None = option(None, help="group size, or none for per-channel", ge=1)
    inner: Inner = option(Inner(), help="a nested block")
    level: Literal[0, 1] = option(0, help="0 or 1")
    extra: dict[str, Any] = option(help="anything", default_factory=dict)
    anything: Any = option(None, help="taken as it is")


@dataclass(frozen=True)
class Required:
    source: str = option(help="where the model is")
    n: int = option(1, help="a count")

    def validate(self, path: str) -> None:
        if self.n < 1:
            raise RecipeError(f"{path}.n: must be at least 1")


def _refused(data: Any, cls: type = Opts, path: str = "passes[0]") -> str:
    with pytest.raises(RecipeError) as e:
        from_dict(cls, data, path)
    return str(e.value)


# ---- the happy path -------------------------------------------------------------------------


def test_defaults_and_none_data() -> None:
    assert from_dict(Opts, {}, "p") == Opts()
    assert from_dict(Opts, None, "p") == Opts()


def test_values_are_converted_lists_to_tuples_ints_to_floats() -> None:
    cfg = from_dict(
        Opts,
        {
            "bits": 4,
            "alpha": 1,
            "targets": ["encoder.*", "re:.*\\.q"],
            "sizes": [2, 4],
            "group": 128,
            "inner": {"steps": 5},
            "extra": {"k": [1]},
            "anything": {"x": object},
        },
        "p",
    )
    assert cfg.bits == 4 and cfg.alpha == 1.0 and isinstance(cfg.alpha, float)
    assert cfg.targets == ("encoder.*", "re:.*\\.q") and cfg.sizes == (2, 4)
    assert cfg.group == 128 and cfg.inner == Inner(steps=5, lr=1e-3)
    assert cfg.extra == {"k": [1]} and cfg.anything == {"x": object}


def test_to_dict_round_trips_and_turns_tuples_into_lists() -> None:
    cfg = from_dict(Opts, {"targets": ["a"], "inner": {"lr": 0.5}, "group": 64}, "p")
    data = to_dict(cfg)
    assert data["targets"] == ["a"] and data["sizes"] == [1, 32] and data["inner"] == {"steps": 10, "lr": 0.5}
    assert list(data) == [f.name for f in dataclasses.fields(Opts)]
    assert from_dict(Opts, data, "p") == cfg
    assert to_dict({"a": (1, (2,))}) == {"a": [1, [2]]}
    assert to_dict(Opts) is Opts  # a class is not an instance


# ---- refusals, with the path --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"bitz": 4},
            "passes[0].bitz: unknown key; allowed keys here: bits, scheme, count, alpha, enabled, targets, "
            "sizes, group, inner, level, extra, anything",
        ),
        ({"bits": 3}, "passes[0].bits: 3 is not one of 4, 8"),
        ({"bits": True}, "passes[0].bits: True is not one of 4, 8"),  # True == 1 but is not an int here
        ({"bits": "8"}, "passes[0].bits: '8' is not one of 4, 8"),
        ({"level": True}, "passes[0].level: True is not one of 0, 1"),  # True == 1, still refused
        ({"scheme": "awq"}, "passes[0].scheme: 'awq' is not one of rtn, gptq"),
        ({"count": 1.5}, "passes[0].count: expected an integer, got 1.5"),
        ({"count": True}, "passes[0].count: expected an integer, got True"),
        ({"count": INT_MAX + 1}, "passes[0].count: 1000001 is out of range (allowed: at most 1,000,000)"),
        ({"alpha": "0.5"}, "passes[0].alpha: expected a number, got '0.5'"),
        ({"alpha": False}, "passes[0].alpha: expected a number, got False"),
        ({"alpha": float("nan")}, "passes[0].alpha: nan is not a finite number"),
        ({"alpha": float("-inf")}, "passes[0].alpha: -inf is not a finite number"),
        ({"alpha": 10**400}, "passes[0].alpha: " + show(10**400) + " is not a finite number"),
        ({"alpha": 1.5}, "passes[0].alpha: 1.5 is out of range (allowed: 0 to 1)"),
        ({"enabled": "yes"}, "passes[0].enabled: expected true or false, got 'yes'"),
        ({"enabled": 1}, "passes[0].enabled: expected true or false, got 1"),
        ({"targets": "encoder.*"}, "passes[0].targets: expected a list of str, got str 'encoder.*'"),
        ({"targets": [1]}, "passes[0].targets[0]: expected a string, got 1"),
        ({"sizes": [1, 0]}, "passes[0].sizes[1]: 0 is out of range (allowed: 1 to 1,000,000)"),
        ({"sizes": [1, 2, 3, 4]}, "passes[0].sizes: 4 entries; at most 3 are allowed"),
        ({"sizes": {"a": 1}}, "passes[0].sizes: expected a list of int, got dict {'a': 1}"),
        ({"group": 0}, "passes[0].group: 0 is out of range (allowed: 1 to 1,000,000)"),
        ({"group": "big"}, "passes[0].group: expected an integer, got 'big'"),
        ({"inner": {"steps": 0}}, "passes[0].inner.steps: 0 is out of range (allowed: 1 to 1,000,000)"),
        ({"inner": {"lr": 0}}, "passes[0].inner.lr: 0.0 is out of range (allowed: above 0, at most 1)"),
        ({"inner": {"lrr": 1}}, "passes[0].inner.lrr: unknown key; allowed keys here: steps, lr"),
        ({"inner": [1]}, "passes[0].inner: expected a mapping of options, got list [1]"),
        ({"extra": [1]}, "passes[0].extra: expected a mapping, got [1]"),
    ],
)
def test_refusals_name_the_path_and_what_is_allowed(data: dict[str, Any], message: str) -> None:
    assert _refused(data) == message


def test_null_where_none_is_not_allowed() -> None:
    assert _refused({"count": None}) == "passes[0].count: expected an integer, got None"

    @dataclass(frozen=True)
    class Union2:
        size: int | str = option(1, help="either")

    assert (
        _refused({"size": None}, Union2) == "passes[0].size: null is not allowed here (expected int or str)"
    )
    assert _refused({"size": 1.5}, Union2) == "passes[0].size: 1.5 is not int or str"
    assert from_dict(Union2, {"size": "auto"}, "p").size == "auto"


def test_ints_are_bounded_by_int_max_at_the_edges() -> None:
    # the lower default bound is enforced too (its message leaves -INT_MAX out of the range it shows)
    assert _refused({"count": -INT_MAX - 1}).startswith(
        "passes[0].count: -1000001 is out of range (allowed: "
    )
    assert from_dict(Opts, {"count": INT_MAX}, "p").count == INT_MAX
    assert from_dict(Opts, {"count": -INT_MAX}, "p").count == -INT_MAX
    assert from_dict(Opts, {"sizes": [1] * 3}, "p").sizes == (1, 1, 1)


def test_list_length_default_bound() -> None:
    @dataclass(frozen=True)
    class Many:
        names: tuple[str, ...] = option((), help="names")

    assert len(from_dict(Many, {"names": ["a"] * MAX_ITEMS}, "p").names) == MAX_ITEMS
    assert (
        _refused({"names": ["a"] * (MAX_ITEMS + 1)}, Many)
        == "passes[0].names: 1025 entries; at most 1024 are allowed"
    )


def test_a_bad_regular_expression_pattern_is_refused() -> None:
    message = _refused({"targets": ["ok.*", "re:(unclosed"]})
    assert message.startswith("passes[0].targets[1]: 're:(unclosed' is not a valid regular expression (")
    assert message.endswith("); fix it or use a glob without re:")
    assert from_dict(Opts, {"targets": ["(not-a-regex-without-re"]}, "p").targets == (
        "(not-a-regex-without-re",
    )


def test_not_a_mapping_and_odd_keys() -> None:
    assert _refused([1, 2]) == "passes[0]: expected a mapping of options, got list [1, 2]"
    assert _refused({1: 2}) == "passes[0].1: unknown key; allowed keys here: " + ", ".join(
        f.name for f in dataclasses.fields(Opts)
    )
    assert _refused({"k" * 100: 1}).startswith("passes[0]." + "k" * 60 + ": unknown key")


def test_required_keys_and_validate() -> None:
    assert _refused({}, Required, "model") == "model.source: required key is missing (where the model is)"
    assert _refused({"source": "x", "n": 0}, Required, "model") == "model.n: must be at least 1"
    assert from_dict(Required, {"source": "x"}, "model") == Required("x", 1)
    assert _refused({"n": 2}, Required, "") == "source: required key is missing (where the model is)"


def test_show_cuts_long_values() -> None:
    assert show("x" * 10) == "'xxxxxxxxxx'"
    assert show("x" * 100) == "'" + "x" * 56 + "..."
    assert len(show(list(range(100)))) == 60
    assert show_key("a" * 70) == "a" * 60 and show_key(3) == "3"


def test_option_refuses_a_mutable_default() -> None:
    with pytest.raises(TypeError, match="use a tuple"):
        option([1], help="x")


def test_unsupported_field_type_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class Odd:
        s: set[int] = option(frozenset(), help="a set")

    with pytest.raises(TypeError, match=r"config type set\[int\] at p\.s is not supported"):
        from_dict(Odd, {"s": [1]}, "p")


# ---- descriptions -----------------------------------------------------------------------------


def test_describe_bounds() -> None:
    assert describe_bounds(int, {}) == "integer at most 1,000,000"
    assert describe_bounds(int, {"ge": 1}) == "integer 1 to 1,000,000"
    assert describe_bounds(float, {"gt": 0.0, "le": 1.0}) == "number (finite) above 0, at most 1"
    assert describe_bounds(float, {}) == "number (finite)"
    assert describe_bounds(tuple[int, ...], {"ge": 1}) == "integer 1 to 1,000,000"
    assert (
        describe_bounds(int | float | None, {"ge": 0}) == "integer 0 to 1,000,000; number (finite) at least 0"
    )
    assert describe_bounds(str, {}) == ""
    assert describe_bounds(float, {"ge": 1000.0}) == "number (finite) at least 1,000.0"


def test_describe_fields_rows() -> None:
    rows = {name: row for name, *row in describe_fields(Opts)}
    assert rows["bits"] == ["one of 4, 8", "8", "weight bits"]  # a Literal has no range
    assert rows["scheme"] == ["one of 'rtn', 'gptq'", "'rtn'", "algorithm"]
    assert rows["alpha"] == ["float", "0.5", "migration strength [number (finite) 0 to 1]"]
    assert rows["targets"] == ["a list of str", "('*',)", "layer patterns"]
    assert rows["group"] == [
        "int or null",
        "None",
        "group size, or none for per-channel [integer 1 to 1,000,000]",
    ]
    assert rows["inner"][0] == "Inner"
    assert describe_fields(Required)[0] == ("source", "str", "required", "where the model is")


def test_config_classes_of_a_dataclass_and_of_a_union() -> None:
    assert config_classes(Opts) == [Opts]
    assert config_classes(Opts | Inner) == [Opts, Inner]
    assert config_classes(Opts | None) == [Opts]
    with pytest.raises(TypeError, match="neither a config dataclass nor a union of them"):
        config_classes(int | str)
    with pytest.raises(TypeError):
        config_classes(Opts())
