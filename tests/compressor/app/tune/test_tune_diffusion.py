"""`compressor tune` on a tiny class-conditional UNet under an FD budget: the denoiser timed by
batch, each Linear at the rows it really sees, the layer costs as FD to the teacher's own
samples, and the written recipe compiled back under the budget."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from compressor.app.cli import main  # noqa: E402
from compressor.app.tune.options import Budget  # noqa: E402
from compressor.app.tune.sensitivity import SensitivityProbe  # noqa: E402
from tests.helpers.diffusion import save_tiny_teacher  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread

DATA = {"corpus": "sklearn-digits", "calibration_samples": 32, "eval_samples": 40, "batch_size": 32}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("tune-teacher"))


def test_fd_costs_are_distances_to_the_teachers_samples(teacher, adapter, data) -> None:
    """The teacher scores minus its own FD; a wrecked layer costs more than its int8 form."""
    budget = Budget.parse("fd<=5")
    assert (
        budget.score(2.0) == -2.0 and budget.value_of(-2.0) == 2.0 and budget.recipe_key == "headline_limit"
    )
    probe = SensitivityProbe(
        adapter, copy.deepcopy(teacher), data.calibration, budget, samples=32, held_out=data.eval
    )
    teacher_fd = adapter.metrics(teacher, teacher, data.eval)["fd"]
    assert probe.teacher_score == pytest.approx(-teacher_fd, rel=1e-6, abs=1e-6)
    name = "unet.time_embedding.linear_2"
    base, costs, _ = probe.costs(teacher, {name: ["float", "int8"]})
    assert base == pytest.approx(-teacher_fd, rel=1e-6, abs=1e-6) and costs[name]["int8"] >= 0.0
    wrecked = copy.deepcopy(teacher)
    with torch.no_grad():
        wrecked.get_submodule(name).weight.mul_(-4.0)
    assert base - probe.fidelity(wrecked) > costs[name]["int8"]


def test_tune_a_denoiser_under_an_fd_budget(
    teacher_dir: Path, tmp_path: Path, monkeypatch, adapter, teacher
) -> None:
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    base = {
        "name": "tiny-unet-base",
        "target": "cpu",
        "model": {"source": str(teacher_dir), "adapter": "diffusers"},
        "data": DATA,
        "passes": [{"pass": "quantize", "method": "int8"}],
        "exports": [{"format": "diffusers-pipeline"}],
        "evaluation": {"run_bench": False},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    from compressor.adapters.diffusion.adapter import DiffusersAdapter

    scorer = DiffusersAdapter(eval_samples=40)
    model = scorer.load(str(teacher_dir))
    d = scorer.make_data(type("S", (), DATA)(), 0)
    limit = round(1.5 * scorer.metrics(model, model, d.eval)["fd"], 3)
    out = tmp_path / "t" / "tuned.yaml"
    code = main(
        ["tune", "--recipe", str(tmp_path / "base.yaml"), "--out", str(out), "--budget", f"fd<={limit}",
         "--batch", "2,16", "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    record = json.loads((out.parent / "tune.json").read_text())
    assert record["shapes"] == ["2x1", "16x1"]  # a denoiser is timed by batch alone
    assert [s["name"] for s in record["structures"]] == ["original"]  # no prunable anatomy
    last = record["verifications"][-1]
    assert last["met"] and last["fidelity"] <= limit
    assert set(last["latency"]) == {"2x1", "16x1"}
    recipe = yaml.safe_load(out.read_text())
    assert recipe["evaluation"]["headline_limit"] == limit
    bundle = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(out), "--out", str(bundle), "--no-bench"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["passes"][-1]["metrics"]["fd"] <= limit


def test_a_denoisers_linears_are_timed_at_batch_rows(teacher_dir: Path, tmp_path: Path) -> None:
    """The time embedding and the resnets' projections see [batch, channels]: rows (batch, 1)."""
    from compressor.app.tune.options import TuneOptions
    from compressor.app.tune.tune import Tuner

    base = {"name": "b", "target": "cpu", "model": {"source": str(teacher_dir), "adapter": "diffusers"},
            "data": DATA, "passes": [{"pass": "quantize", "method": "int8"}],
            "exports": [{"format": "diffusers-pipeline"}], "evaluation": {"run_bench": False}}  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    tuner = Tuner(
        TuneOptions(budget=Budget.parse("fd<=100"), recipe=str(tmp_path / "base.yaml"), batches=(3,))
    )
    tuner.load()
    assert tuner.opts.io_shapes == [(3, 1)]
    rows = tuner.layer_rows(tuner.model)
    lin = tuner.model.get_submodule("unet.time_embedding.linear_1")
    assert rows["unet.time_embedding.linear_1"] == {(3, 1): (lin.in_features, lin.out_features, 3, 1)}
    assert set(rows) == set(tuner.adapter.linear_names(tuner.model))
