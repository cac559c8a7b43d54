"""The fidelity gate (compressor.fidelity): plan-time refusal of gates an adapter cannot judge,
and the final check that refuses to write a bundle whose model breaks a gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compressor.adapters.base import Headline
from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.adapters.hf_encoder import HFEncoderAdapter
from compressor.adapters.module import ModuleAdapter
from compressor.errors import PassError, RecipeError
from compressor.fidelity import check_evaluation, fidelity_gate
from compressor.recipe import EvaluationSpec, load_recipe, parse_recipe

ENCODER = HFEncoderAdapter()


# ---- encoder: min_mean_cosine as before


def test_encoder_floor_trips_below_and_passes_above() -> None:
    ev = EvaluationSpec(min_mean_cosine=0.99)
    check_evaluation(ev, ENCODER)
    fidelity_gate(ev, ENCODER, {"mean_cosine": 0.995, "min_cosine": 0.9})
    fidelity_gate(ev, ENCODER, {"mean_cosine": 0.99})  # at the floor: passes
    with pytest.raises(PassError) as e:
        fidelity_gate(ev, ENCODER, {"mean_cosine": 0.98123})
    msg = str(e.value)
    assert msg == "final mean cosine 0.98123 is below evaluation.min_mean_cosine 0.99; no bundle was written"


def test_no_gate_passes_anything() -> None:
    fidelity_gate(EvaluationSpec(), ENCODER, {})
    fidelity_gate(EvaluationSpec(), ENCODER, {"mean_cosine": -1.0})


@pytest.mark.parametrize("value", [None, float("nan")])
def test_a_gated_metric_that_is_missing_or_nan_never_passes(value: float | None) -> None:
    metrics = {} if value is None else {"mean_cosine": value}
    with pytest.raises(PassError, match="evaluation.min_mean_cosine: mean_cosine .* no bundle was written"):
        fidelity_gate(EvaluationSpec(min_mean_cosine=0.5), ENCODER, metrics)


def test_headline_limit_on_a_higher_is_better_metric_is_a_floor() -> None:
    ev = EvaluationSpec(headline_limit=0.99)
    check_evaluation(ev, ENCODER)
    fidelity_gate(ev, ENCODER, {"mean_cosine": 0.991})
    with pytest.raises(PassError, match=r"is below evaluation.headline_limit 0.99; no bundle was written"):
        fidelity_gate(ev, ENCODER, {"mean_cosine": 0.95})


def test_headline_limit_on_a_lower_is_better_metric_is_a_ceiling() -> None:
    lm = CausalLMAdapter()
    ev = EvaluationSpec(headline_limit=1.05)
    check_evaluation(ev, lm)
    fidelity_gate(ev, lm, {"perplexity_ratio": 1.04, "mean_cosine": 0.2})
    with pytest.raises(
        PassError, match=r"perplexity ratio .* 1.07000 is above evaluation.headline_limit 1.05"
    ):
        fidelity_gate(ev, lm, {"perplexity_ratio": 1.07, "mean_cosine": 0.999})
    check_evaluation(EvaluationSpec(min_mean_cosine=0.9), lm)  # causal LMs report logit cosines too


def test_every_adapter_declares_a_headline_it_reports() -> None:
    from compressor.adapters.diffusion.adapter import DiffusersAdapter

    for cls in (HFEncoderAdapter, CausalLMAdapter, ModuleAdapter, DiffusersAdapter):
        assert isinstance(cls.headline, Headline)
        assert cls.headline.key in cls.fidelity_metrics, cls


def test_module_adapter_reports_what_it_declares() -> None:
    import torch

    from compressor.adapters.base import DataSplits

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [{"input": torch.randn(8, 4)}]
    adapter = ModuleAdapter(model, DataSplits(calibration=batches, train=[], eval=batches))
    metrics = adapter.metrics(model, model, batches)
    assert ModuleAdapter.fidelity_metrics <= metrics.keys()
    assert metrics[ModuleAdapter.headline.key] == pytest.approx(1.0)


def test_an_adapter_without_a_headline_is_refused_a_headline_limit() -> None:
    class Bare(HFEncoderAdapter):
        name = "bare"

    Bare.headline = None
    with pytest.raises(RecipeError, match="evaluation.headline_limit: the bare adapter declares no headline"):
        check_evaluation(EvaluationSpec(headline_limit=0.5), Bare())


def test_headline_limit_is_bounded() -> None:
    with pytest.raises(RecipeError, match="evaluation.headline_limit"):
        parse_recipe({"evaluation": {"headline_limit": -1.0}}, "r.yaml")
    with pytest.raises(RecipeError, match="evaluation.headline_limit"):
        parse_recipe({"evaluation": {"headline_limit": float("inf")}}, "r.yaml")


# ---- diffusion: the bug this fixes (min_mean_cosine used to pass every diffusion recipe)


def _digits_recipe(source: str, evaluation: dict[str, Any]) -> Any:
    data = load_recipe("digits-steps-consistency").to_dict()
    data["model"]["source"] = source
    data["data"].update(eval_samples=20, calibration_samples=32)
    data["passes"] = []
    data["exports"] = [{"format": "diffusers-pipeline", "onnx": False, "check_samples": 2}]
    data["evaluation"] = {"run_bench": False, **evaluation}
    return parse_recipe(data, "digits.yaml")


def test_min_mean_cosine_on_a_diffusion_recipe_is_refused_at_plan_time(tmp_path: Path) -> None:
    from compressor.adapters.diffusion.adapter import DiffusersAdapter
    from compressor.app.compile import compile_recipe

    with pytest.raises(RecipeError) as e:
        check_evaluation(EvaluationSpec(min_mean_cosine=0.9), DiffusersAdapter())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("evaluation.min_mean_cosine: the diffusers adapter does not report mean_cosine")
    assert "headline metric is fd" in msg and "use evaluation.headline_limit instead" in msg
    # through compile: refused before the model loads (this source does not exist) and before any bundle
    recipe = _digits_recipe(str(tmp_path / "no-such-teacher"), {"min_mean_cosine": 0.9})
    with pytest.raises(RecipeError, match="evaluation.min_mean_cosine: the diffusers adapter"):
        compile_recipe(recipe, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_headline_gate_trips_on_a_tiny_diffusion_model(adapter, data, teacher, one_thread) -> None:
    check_evaluation(EvaluationSpec(headline_limit=1.0), adapter)
    final = adapter.metrics(teacher, teacher, data.eval)
    fd = final["fd"]
    assert fd > 0
    fidelity_gate(EvaluationSpec(headline_limit=fd * 1.01), adapter, final)
    with pytest.raises(PassError) as e:
        fidelity_gate(EvaluationSpec(headline_limit=fd * 0.5), adapter, final)
    assert "Frechet distance" in str(e.value) and "is above evaluation.headline_limit" in str(e.value)
    assert str(e.value).endswith("no bundle was written")
    with pytest.raises(PassError, match="fd is missing from the final metrics of the diffusers adapter"):
        fidelity_gate(EvaluationSpec(headline_limit=fd), adapter, {"class_acc": 1.0})


def test_headline_gate_leaves_no_diffusion_bundle(tmp_path: Path, adapter, teacher, one_thread) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler

    from compressor.app.compile import compile_recipe

    unet = teacher.unet  # the tiny teacher as a plain diffusers folder (label embedding back inside)
    unet.class_embedding = teacher.conditioner.label_embedding
    unet.register_to_config(class_embed_type=None, num_class_embeds=11)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(teacher.train_config)).save_pretrained(
        tmp_path / "t"
    )
    (tmp_path / "t" / "sampling.json").write_text('{"steps": 2, "guidance_scale": 2.0}')
    recipe = _digits_recipe(str(tmp_path / "t"), {"headline_limit": 1e-6})  # no model gets an FD this low
    with pytest.raises(
        PassError, match=r"final Frechet distance .* is above evaluation.headline_limit 1e-06"
    ):
        compile_recipe(recipe, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
