"""Adding a pass, as a newcomer would: one config, one class with plan / run / ensures, one
registration. This is the whole of what a new pass family needs besides its own math; a real
one is a folder ``passes/<family>/`` with the pass in ``<name>.py`` and a line in
``passes/__init__.py`` (here the registry entry is patched in for the test's duration).

The example rounds the selected Linear layers' weights to a grid: its plan refuses a layer an
earlier pass already quantized and records the grid as a fact that later steps see, its run
returns the model with its details, and its ensures checks the invariant on that output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor import api
from compressor.config import option
from compressor.errors import PassError, PlanError
from compressor.modules import get_linear, select_modules
from compressor.passes import PASSES
from compressor.pipeline import Pass, PassContext, PassOutput
from compressor.planning import FLOAT, PlanState
from compressor.recipe import parse_recipe


@dataclass(frozen=True)
class RoundWeightsConfig:
    targets: tuple[str, ...] = option(("*",), help="module-name patterns of the Linear layers", patterns=True)
    step: float = option(1.0 / 64, help="the grid the weights are rounded to", gt=0.0, le=1.0)


class RoundWeightsPass(Pass[RoundWeightsConfig]):
    name = "round_weights"
    description = "round the selected Linear weights to a grid (an example pass)"
    Config = RoundWeightsConfig

    def plan(self, state: PlanState) -> PlanState:
        names = state.select(self.config.targets, what=self.name)
        for n in names:
            if state.linears[n].form != FLOAT:
                raise PlanError(
                    f"{state.where}: {n} is {state.linears[n].form}; round_weights takes float layers"
                )
        facts = {"grid": self.config.step}
        return state.with_linears({n: dataclasses.replace(state.linears[n], facts=facts) for n in names})

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        step = self.config.step
        names = select_modules(model, self.config.targets, what=self.name)
        with torch.no_grad():
            for n in names:
                w = get_linear(model, n).weight
                w.copy_(torch.round(w / step) * step)
        return PassOutput(model, {"rounded_layers": names, "step": step})

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:
        step = out.details["step"]
        for n in out.details["rounded_layers"]:  # what run decided, from its output: no state on self
            w = get_linear(out.model, n).weight.detach()
            off_grid = float((w / step - torch.round(w / step)).abs().max())
            if off_grid > 1e-3:
                raise PassError(f"{self.name}: {n} has weights off the grid ({off_grid:.3g})")


def _recipe(source: Path, passes: list[dict[str, object]]) -> object:
    return parse_recipe(
        {
            "target": "cpu",
            "model": {"source": str(source)},
            "data": {
                "calibration_samples": 8,
                "train_samples": 0,
                "eval_samples": 8,
                "max_length": 16,
                "batch_size": 8,
            },
            "passes": passes,
            "evaluation": {"run_bench": False},
        },
        "example.yaml",
    )


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PASSES, RoundWeightsPass.name, RoundWeightsPass)


@pytest.mark.usefixtures("registered")
def test_a_new_pass_runs_from_a_recipe_and_records_its_details(tiny_bert_dir: Path) -> None:
    recipe = _recipe(tiny_bert_dir, [{"pass": "round_weights", "targets": ["encoder.*"], "step": 0.0625}])
    c = api.compress(recipe)
    result = c.results[-1]
    assert result.name == "round_weights" and result.details["step"] == 0.0625
    assert len(result.details["rounded_layers"]) == 12  # 2 layers x (q, k, v, out, ffn in, ffn out)
    assert 0.5 < result.metrics["mean_cosine"] < 1.0  # a coarse grid costs fidelity, measured by the adapter
    w = c.model.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(w, torch.round(w / 0.0625) * 0.0625)


@pytest.mark.usefixtures("registered")
def test_its_options_and_plan_are_checked_before_any_work(tiny_bert_dir: Path) -> None:
    from compressor.errors import RecipeError

    with pytest.raises(RecipeError, match=r"passes\[0\]\.stepp: unknown key"):
        _recipe(tiny_bert_dir, [{"pass": "round_weights", "stepp": 0.1}])
    with pytest.raises(PlanError, match="target pattern 'decoder.*' matches no Linear layer"):
        api.compress(_recipe(tiny_bert_dir, [{"pass": "round_weights", "targets": ["decoder.*"]}]))
    after_quantize = [
        {"pass": "quantize", "targets": ["encoder.layer.0.*"]},
        {"pass": "round_weights", "targets": ["encoder.*"]},
    ]  # the plan knows what the quantize before it leaves
    with pytest.raises(
        PlanError, match=r"passes\[1\] \(round_weights\): encoder.layer.0.attention.self.query is int8"
    ):
        api.compress(_recipe(tiny_bert_dir, after_quantize))
