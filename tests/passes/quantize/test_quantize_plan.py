"""The quantize pass's configs (one per scheme, picked by ``method``) and its plan: the form and
facts every selected layer leaves with, judged on the layers as the passes before leave them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from torch import nn

from compressor.config import to_dict
from compressor.errors import PlanError, RecipeError
from compressor.passes.quantize.quantize import (
    Fp8Config,
    Int4Config,
    Int8Config,
    QuantizePass,
    quantize_config,
)
from compressor.planning import FLOAT, PlanState
from compressor.targets import get_target


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)


def _state(target: str = "a100") -> PlanState:
    model = nn.Sequential(_Block(), _Block())
    adapter: Any = object()  # the plan never asks the adapter
    return PlanState.from_model(model, get_target(target), adapter).replace(where="passes[0] (quantize)")


def _parse(**options: Any) -> Any:
    return QuantizePass.config_from_dict(options, "r.yaml: passes[1]")


def test_method_picks_the_scheme_config() -> None:
    assert isinstance(_parse(), Int8Config) and _parse().method == "int8"
    assert isinstance(_parse(method="fp8", fp8_weights="per_tensor"), Fp8Config)
    cfg = _parse(method="int4", group_size=32)
    assert isinstance(cfg, Int4Config) and cfg.group_size == 32
    assert isinstance(QuantizePass.config_from_dict(None, "p"), Int8Config)
    assert isinstance(QuantizePass().config, Int8Config)
    # the manifest lists only the scheme's options
    assert "group_size" not in to_dict(_parse()) and "smoothquant" not in to_dict(cfg)
    assert list(to_dict(cfg))[0] == "method"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"group_size": 32}, r"^r.yaml: passes\[1\]\.group_size: not an option of quantize method int8 \(an option "
         r"of method int4"),
        ({"method": "fp8", "smoothquant": True}, r"passes\[1\]\.smoothquant: not an option of quantize method fp8 "
         r"\(an option of method int8"),
        ({"method": "int4", "max_float_layers": 2}, r"max_float_layers: not an option of quantize method int4"),
        ({"method": "int4", "activations": "static_per_tensor"}, r"activations: not an option of quantize method "
         r"int4 \(an option of method int8;"),
        ({"method": "int8", "fp8_weights": "per_tensor"}, r"fp8_weights: not an option of quantize method int8 "
         r"\(an option of method fp8"),
        ({"bitz": 3}, r"passes\[1\]\.bitz: unknown key; allowed keys here: method, targets"),
        ({"method": "int4", "bitz": 3}, r"passes\[1\]\.bitz: unknown key; allowed keys here: method, .*group_size"),
        ({"method": "int3"}, r"passes\[1\]\.method: 'int3' is not one of int8, fp8, int4"),
        ({"method": ["int8"]}, r"passes\[1\]\.method: \['int8'\] is not one of int8, fp8, int4"),
        ({"method": "int4", "group_size": 48}, r"group_size: 48 is not one of 32, 64, 128"),
    ],
)  # fmt: skip
def test_options_are_refused_naming_the_key_and_the_scheme(options: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        _parse(**options)


def test_quantize_config_builds_each_scheme() -> None:
    assert quantize_config() == Int8Config()
    assert quantize_config("int4", group_size=64) == Int4Config(group_size=64)
    assert quantize_config(method="fp8").method == "fp8"
    with pytest.raises(TypeError, match="group_size: not an option of quantize method int8"):
        quantize_config(group_size=64)
    with pytest.raises(TypeError, match="quantize method 'int2' is not one of int8, fp8, int4"):
        quantize_config("int2")


@pytest.mark.parametrize(
    ("target", "options", "facts"),
    [
        ("cpu", {}, {"activations": "dynamic_per_tensor", "explicit_smooth": False}),
        ("a100", {}, {"activations": "dynamic_per_token", "explicit_smooth": False}),
        ("a100", {"activations": "static_per_tensor", "smoothquant": True},
         {"activations": "static_per_tensor", "explicit_smooth": True}),
        ("a100", {"smoothquant": True, "fold_only": True},
         {"activations": "dynamic_per_token", "explicit_smooth": False}),
        ("h100", {"method": "fp8"}, {"weights": "per_channel", "activations": "dynamic_per_token"}),
        ("h100", {"method": "fp8", "fp8_weights": "per_tensor", "fp8_activations": "static_per_tensor"},
         {"weights": "per_tensor", "activations": "static_per_tensor"}),
        ("cpu", {"method": "int4", "group_size": 64, "int4_activations": "int8"},
         {"symmetric": True, "group_size": 64, "algorithm": "gptq", "explicit_smooth": False,
          "activations": "int8"}),
        ("cpu", {"method": "int4", "group_size": 32, "int4_algorithm": "awq", "symmetric": False},
         {"symmetric": False, "group_size": 32, "algorithm": "awq", "explicit_smooth": True,
          "activations": "float"}),
        ("cpu", {"method": "int4", "int4_algorithm": "awq", "awq_explicit_scales": False, "group_size": 64},
         {"symmetric": True, "group_size": 64, "algorithm": "awq", "explicit_smooth": False,
          "activations": "float"}),
    ],
)  # fmt: skip
def test_plan_gives_the_selected_layers_their_form_and_facts(
    target: str, options: dict[str, Any], facts: dict[str, Any]
) -> None:
    p = QuantizePass(_parse(targets=["0.*"], **options))
    before = _state(target)
    after = p.plan(before)
    method = options.get("method", "int8")
    for n in ("0.up", "0.down"):
        lin = after.linears[n]
        assert (lin.form, dict(lin.facts), lin.by) == (method, facts, "passes[0] (quantize)")
        assert (lin.in_features, lin.out_features) == (
            before.linears[n].in_features,
            before.linears[n].out_features,
        )
    assert after.linears["1.up"] == before.linears["1.up"]  # not selected: still float
    assert after.forms() == {method: ["0.up", "0.down"]}


def test_plan_judges_the_layers_as_the_passes_before_leave_them() -> None:
    state = _state("cpu")
    # a prune before this pass left 1.down with 96 input features: group size 64 no longer divides it
    pruned = state.with_linears({"1.down": dataclasses.replace(state.linears["1.down"], in_features=96)})
    QuantizePass(_parse(method="int4", group_size=64)).plan(state)
    with pytest.raises(PlanError, match="quantize.group_size: 64 does not divide 1.down's 96 input features"):
        QuantizePass(_parse(method="int4", group_size=64)).plan(pruned)
    QuantizePass(_parse(method="int4", group_size=32)).plan(pruned)
    # layers an earlier pass quantized are not float Linears any more: not selected again
    first = QuantizePass(_parse(method="int4", group_size=64, targets=["0.*"])).plan(state)
    second = QuantizePass(_parse()).plan(first)
    assert second.forms() == {"int4": ["0.up", "0.down"], "int8": ["1.up", "1.down"]}
    with pytest.raises(PlanError, match="target pattern '0.\\*' matches no Linear layer"):
        QuantizePass(_parse(targets=["0.*"])).plan(first)


def test_plan_refusals() -> None:
    with pytest.raises(PlanError, match="quantize.method: fp8 is not supported on target 'a100'"):
        QuantizePass(_parse(method="fp8")).plan(_state("a100"))
    assert (
        QuantizePass(_parse(activations="dynamic_per_token")).plan(_state("cpu")).forms()
    )  # allowed on the CPU
    with pytest.raises(PlanError, match="target pattern 'decoder.\\*' matches no Linear layer"):
        QuantizePass(_parse(targets=["decoder.*"])).plan(_state())
    assert FLOAT not in _state().forms()
