"""`compressor tune` on a tiny random Llama: a perplexity-ratio budget, prefill and decode
shapes, the layer costs on the log-perplexity scale, and the written recipe compiled back."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from compressor.adapters import make_adapter
from compressor.app.cli import main
from compressor.app.tune.options import Budget
from compressor.app.tune.sensitivity import SensitivityProbe

DATA = {"calibration_samples": 16, "train_samples": 32, "eval_samples": 24, "max_length": 32, "batch_size": 8}


def _base(tmp_path: Path, lm: Path) -> Path:
    recipe = {
        "name": "tiny-lm-base",
        "target": "cpu",
        "model": {"source": str(lm)},
        "data": DATA,
        "passes": [{"pass": "quantize", "targets": ["model.layers.*"]}],
        "exports": [{"format": "onnx", "min_cosine": 0.99}],
        "evaluation": {"run_bench": False},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_budget_scale_is_minus_log_ratio() -> None:
    b = Budget.parse("perplexity_ratio<=1.05")
    assert b.recipe_key == "headline_limit" and not b.higher_is_better
    assert b.score(1.0) == 0.0 and b.floor == pytest.approx(-math.log(1.05))
    assert b.value_of(b.score(1.3)) == pytest.approx(1.3)
    assert b.met_by(1.04) and not b.met_by(1.06) and not b.met_by(float("nan")) and not b.met_by(None)
    c = Budget.parse("mean_cosine>=0.97")
    assert c.score(0.98) == 0.98 and c.met_by(0.98) and not c.met_by(0.96)


def test_lm_layer_costs_are_perplexity_losses(tiny_llama_dir: Path) -> None:
    """The teacher scores perfect (0 on the -log ratio scale); a layer whose weights are
    wrecked costs more than the same layer in int8; no cost is negative."""
    from compressor.recipe import DataSpec

    adapter = make_adapter("auto", str(tiny_llama_dir))
    model = adapter.load(str(tiny_llama_dir))
    data = adapter.make_data(DataSpec(**DATA), 0)
    budget = Budget.parse("perplexity_ratio<=1.05")
    probe = SensitivityProbe(adapter, copy.deepcopy(model), data.calibration[:1], budget)
    assert probe.fidelity(model) == pytest.approx(0.0, abs=1e-9)
    name = "model.layers.0.mlp.down_proj"
    base, costs, inert = probe.costs(model, {name: ["float", "int8", "int4_g32"]})
    assert base == pytest.approx(0.0, abs=1e-9) and not inert
    assert costs[name]["float"] == 0.0 and all(v >= 0.0 for v in costs[name].values())
    wrecked = copy.deepcopy(model)
    with torch.no_grad():
        wrecked.get_submodule(name).weight.mul_(-3.0)
    assert -probe.fidelity(wrecked) > max(costs[name].values())


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tune_a_decoder_lm_under_a_perplexity_budget(
    tiny_llama_dir: Path, tmp_path: Path, cache: Path
) -> None:
    out = tmp_path / "t" / "tuned.yaml"
    code = main(
        ["tune", "--recipe", str(_base(tmp_path, tiny_llama_dir)), "--model", str(tiny_llama_dir), "--out", str(out),
         "--budget", "perplexity_ratio<=1.05", "--batch", "2,8", "--seq-len", "32", "--threads", "1",
         "--structures", "1x128", "--probe-steps", "4", "--recover-steps", "8"]
    )  # fmt: skip
    assert code == 0
    record = json.loads((out.parent / "tune.json").read_text())
    # prefill and decode shapes: each batch at the sequence length and at one new token
    assert record["shapes"] == ["2x32", "8x32", "2x1", "8x1"] and record["primary_shape"] == "8x32"
    assert {s["name"] for s in record["structures"]} == {"original", "1x128"}
    pruned = next(s for s in record["structures"] if s["name"] == "1x128")
    assert "probe_fidelity" in pruned or "skipped" in pruned
    # the lm_head is never a candidate (the quantize pass leaves it alone)
    assert all("lm_head" not in r["layer"] for r in record["rejected"])
    for s in record["structures"]:
        assert all(not name.startswith("lm_head") for name in s.get("costs", {}))
    last = record["verifications"][-1]
    assert last["met"] and 1.0 - 1e-6 <= last["fidelity"] <= 1.05
    assert last["judged_on"].startswith("on its worst evaluation domain")
    assert set(last["latency"]) == {"2x32", "8x32", "2x1", "8x1"}
    recipe = yaml.safe_load(out.read_text())
    assert recipe["evaluation"]["headline_limit"] == 1.05 and "min_mean_cosine" not in recipe["evaluation"]
    bundle = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(out), "--out", str(bundle), "--no-bench"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["passes"][-1]["metrics"]["perplexity_ratio"] <= 1.05
