from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compressor.errors import RecipeError
from compressor.recipe import dump_recipe, load_recipe, parse_recipe, shipped_recipes


def _recipe(**over):
    base = {
        "name": "t",
        "target": "cpu",
        "passes": [{"pass": "quantize", "method": "int8", "targets": ["encoder.*"]}],
        "exports": [{"format": "onnx"}],
    }
    base.update(over)
    return base


def test_shipped_recipes_parse_and_round_trip() -> None:
    names = shipped_recipes()
    assert {"minilm-cpu-int8", "minilm-cpu-pruned-int8", "minilm-24-int8"} <= set(names)
    for name in names:
        r = load_recipe(name)
        again = parse_recipe(yaml.safe_load(dump_recipe(r)), "again")
        assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("name", ["minilm-cpu-pruned-int8", "minilm-24-int8"])
def test_minilm_recipes_plan_against_the_real_model(name: str) -> None:
    """The whole plan (passes' checks, layer patterns, precisions per target) holds on MiniLM."""
    from compressor.app.compile import plan

    recipe = load_recipe(name)
    target, _, model, passes, _ = plan(recipe)
    assert [p.name for p in passes][-1] == "distill"
    assert target.name == ("cpu" if "cpu" in name else "a100")
    assert sum(p.numel() for p in model.parameters()) > 20_000_000  # the real MiniLM, not a toy


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _recipe(passes=[{"pass": "quantize", "bitz": 3}]),
            r"passes\[0\]\.bitz: unknown key; allowed keys here: method",
        ),
        (
            _recipe(passes=[{"pass": "quantise"}]),
            r"passes\[0\]\.pass: unknown pass 'quantise'; known: .*quantize",
        ),
        (_recipe(passes=[{"method": "int8"}]), r"passes\[0\]: each entry needs a 'pass:' key"),
        (
            _recipe(passes=[{"pass": "quantize", "alpha": 1.5}]),
            r"passes\[0\]\.alpha: 1\.5 is out of range \(allowed: 0 to 1\)",
        ),
        (
            _recipe(passes=[{"pass": "quantize", "method": "int3"}]),
            r"passes\[0\]\.method: 'int3' is not one of int8",
        ),
        (
            _recipe(passes=[{"pass": "quantize", "targets": "encoder.*"}]),
            r"passes\[0\]\.targets: expected a list",
        ),
        (_recipe(passes=[{"pass": "distill", "steps": "ten"}]), r"passes\[0\]\.steps: expected an integer"),
        (
            _recipe(passes=[{"pass": "distill", "loss": {"output": "kld"}}]),
            r"passes\[0\]\.loss\.output: 'kld' is not one of",
        ),
        (_recipe(target="tpu"), r"target: unknown target 'tpu'"),
        (
            _recipe(passes=[{"pass": "sparsify", "recover": {"steps": 5}}]),
            r"passes\[0\]\.recover\.warmup_steps: 10 is more than steps \(5\)",
        ),
        (_recipe(exports=[{"format": "onnx", "opset": 11}]), r"exports\[0\]\.opset: 11 is too old"),
        (_recipe(exports=[{"format": "tflite"}]), r"exports\[0\]\.format: unknown export format 'tflite'"),
        (_recipe(data={"batch_size": 0}), r"data\.batch_size: must be at least 1"),
        (
            _recipe(data={"corpus": "sklearn-digits", "wide_train": True}),
            r"data\.wide_train: only the text corpora have more training text",
        ),
        (
            _recipe(passes=[{"pass": "distill", "teacher_cache_mb": -1}]),
            r"passes\[0\]\.teacher_cache_mb: -1 is negative",
        ),
        (_recipe(extra=1), r"extra: unknown key; allowed top-level keys"),
        (
            _recipe(evaluation={"bench": {"threads": "two"}}),
            r"evaluation\.bench\.threads: expected an integer",
        ),
        ([1, 2], "the recipe must be a mapping"),
    ],
)
def test_bad_recipes_name_the_bad_key(data, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(data, "bad.yaml")
    assert str(info.value).startswith("bad.yaml: ")


def test_files_and_names(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("passes: [unclosed\n")
    with pytest.raises(RecipeError, match="broken.yaml: not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not one of the shipped recipes"):
        load_recipe("no-such-recipe")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_recipe()))
    assert load_recipe(good).passes[0].config.targets == ("encoder.*",)


def test_overrides() -> None:
    r = load_recipe("minilm-cpu-int8")
    assert r.with_target("h100").target == "h100"
    assert r.with_model("/some/path").model.source == "/some/path"
