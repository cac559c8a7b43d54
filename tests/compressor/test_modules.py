"""compressor.modules: ``targets`` / ``ignore`` patterns over module names, and module surgery.

A toy model with nested Linear layers; each case is a pattern list and the exact names (or
message) expected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.errors import PlanError
from compressor.modules import get_linear, get_module, matches, select_modules, set_module


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.key = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)
        self.embed = nn.Embedding(10, 4)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("layer.0.query", "layer.*.query", True),
        ("layer.0.query", "*query", True),
        ("layer.0.query", "layer.?.query", True),
        ("layer.10.query", "layer.?.query", False),
        ("layer.0.query", "layer.0", False),  # a glob matches the whole name
        ("layer.0.query", "Layer.*", False),  # case-sensitive, on every platform
        ("layer.0.query", "layer.[01].query", True),
        ("layer.0.query", "re:layer\\.\\d+\\.query", True),
        ("layer.0.query", "re:layer", False),  # a regex is matched in full, not searched
        ("layer.0.query", "re:.*(query|key)", True),
        ("layer.0.key", "re:.*(query|value)", False),
        ("re:x", "re:x", False),  # the prefix is not part of the pattern
    ],
)
def test_matches(name: str, pattern: str, expected: bool) -> None:
    assert matches(name, pattern) is expected


def test_select_modules_in_model_order_without_duplicates() -> None:
    model = Toy()
    assert select_modules(model, ["*"]) == [
        "layer.0.query",
        "layer.0.key",
        "layer.1.query",
        "layer.1.key",
        "head",
    ]
    assert select_modules(model, ["head", "layer.1.*"]) == ["layer.1.query", "layer.1.key", "head"]
    assert select_modules(model, ["*"], ignore=["*.key", "re:head"]) == ["layer.0.query", "layer.1.query"]
    assert select_modules(model, ["layer.0.*"], ignore=["layer.0.*"]) == []
    assert select_modules(model, ["*"], ignore=["no.such.layer"]) == select_modules(
        model, ["*"]
    )  # ignore may miss
    assert select_modules(model, []) == []


def test_select_modules_of_other_types() -> None:
    model = Toy()
    assert select_modules(model, ["*"], types=(nn.LayerNorm,)) == ["layer.0.norm", "layer.1.norm"]
    both = select_modules(model, ["*norm", "embed"], types=(nn.LayerNorm, nn.Embedding))
    assert both == ["layer.0.norm", "layer.1.norm", "embed"]


def test_a_typo_fails_naming_the_layers() -> None:
    with pytest.raises(PlanError) as e:
        select_modules(Toy(), ["layer.*.query", "layer.*.qeury"], what="passes[1] (sparsify)")
    assert str(e.value) == (
        "passes[1] (sparsify): target pattern 'layer.*.qeury' matches no Linear layer of the model "
        "(layers look like: layer.0.query, layer.0.key, layer.1.query, layer.1.key, ...)"
    )


def test_a_pattern_matching_only_another_type_fails_naming_the_types() -> None:
    with pytest.raises(PlanError) as e:
        select_modules(Toy(), ["embed"], types=(nn.Linear, nn.LayerNorm))
    assert str(e.value) == (
        "pass: target pattern 'embed' matches no Linear/LayerNorm layer of the model "
        "(layers look like: layer.0.query, layer.0.key, layer.0.norm, layer.1.query, ...)"
    )


def test_get_linear_and_get_module() -> None:
    model = Toy()
    assert get_linear(model, "layer.1.key") is model.layer[1].key
    assert get_module(model, "layer.0") is model.layer[0]
    norm = get_linear(model, "layer.0.norm")  # anything with a weight tensor passes (Int8Linear does)
    assert norm is model.layer[0].norm
    with pytest.raises(TypeError, match=r"^layer\.0 is a Block, not a Linear layer$"):
        get_linear(model, "layer.0")
    with pytest.raises(AttributeError):
        get_linear(model, "layer.0.value")


def test_set_module_replaces_nested_and_top_level_modules() -> None:
    model = Toy()
    new = nn.Linear(4, 4, bias=False)
    set_module(model, "layer.1.query", new)
    assert model.layer[1].query is new and get_linear(model, "layer.1.query") is new
    assert model.layer[0].query is not new
    head = nn.Identity()
    set_module(model, "head", head)
    assert model.head is head
    x = torch.randn(1, 4)
    assert torch.equal(model.head(x), x)
    assert "head" not in select_modules(model, ["*"])  # no longer a Linear
