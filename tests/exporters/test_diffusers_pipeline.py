"""The diffusers pipeline folder reloads and samples like torch; the ONNX denoiser matches torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.adapters.diffusion.loading import load_diffusion_model
from compressor.adapters.diffusion.schedule import make_scheduler
from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext
from compressor.exporters.diffusers_pipeline import DiffusersPipelineExporter
from compressor.passes.diffusion.consistency_distill import ConsistencyDistillPass
from compressor.passes.diffusion.guidance_distill import GuidanceDistillPass
from compressor.recipe import load_recipe, parse_recipe
from compressor.targets import TARGETS
from tests.helpers.diffusion import make_ctx, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread


def _student(adapter, data):
    model = tiny_teacher()
    for p in (
        GuidanceDistillPass(GuidanceDistillPass.Config(train_steps=2)),
        ConsistencyDistillPass(ConsistencyDistillPass.Config(sampling_steps=2, train_steps=2)),
    ):
        model = p.run(model, make_ctx(model, adapter, data)).model
    return model


def test_pipeline_folder_reloads_with_n_step_scheduler_and_onnx_matches(
    tmp_path: Path, adapter, data
) -> None:
    from diffusers import DiffusionPipeline

    student = _student(adapter, data)
    ectx = ExportContext(target=TARGETS["cpu"], adapter=adapter, data=data, reference_model=student)
    res = DiffusersPipelineExporter().export(student, ectx, tmp_path)
    assert res.verification["pipeline_reload_max_abs_diff"] <= 1e-4
    assert res.verification["onnx"]["max_abs_error"] <= 1e-3
    assert (tmp_path / "denoiser.onnx").stat().st_size > 10_000

    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "pipeline", custom_pipeline=str(tmp_path / "pipeline"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "StepReducedPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    images = pipe([3, 7], generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1) and 0.0 <= images.min() and images.max() <= 1.0

    reloaded = load_diffusion_model(tmp_path / "pipeline")
    assert reloaded.spec == student.spec and reloaded.guidance_embedded
    assert len(make_scheduler(reloaded.train_config, reloaded.spec).timesteps) == 2
    assert reloaded.sample(torch.arange(3), torch.Generator().manual_seed(1))[1] == 2


def test_onnx_check_fails_loudly(tmp_path: Path, adapter, data) -> None:
    student = _student(adapter, data)
    ectx = ExportContext(target=TARGETS["cpu"], adapter=adapter, data=data, reference_model=student)
    strict = DiffusersPipelineExporter(DiffusersPipelineExporter.Config(max_abs_error=1e-12))
    with pytest.raises(ExportError, match="ONNX Runtime differs from torch"):
        strict.export(student, ectx, tmp_path)


def test_recipe_composes_step_reduction_with_int8_and_exports(tmp_path: Path) -> None:
    from diffusers import DDPMPipeline

    from compressor.app.compile import compile_recipe

    teacher = tiny_teacher()
    # write the tiny teacher as a plain diffusers folder (the label embedding back inside the UNet)
    from compressor.adapters.diffusion.conditioners import ClassConditioner  # noqa: F401

    unet = teacher.unet
    unet.class_embedding = teacher.conditioner.label_embedding
    unet.register_to_config(class_embed_type=None, num_class_embeds=11)
    from diffusers import DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(teacher.train_config)).save_pretrained(
        tmp_path / "t"
    )
    (tmp_path / "t" / "sampling.json").write_text('{"steps": 4, "guidance_scale": 2.0}')
    recipe = load_recipe("digits-steps-consistency")
    data = recipe.to_dict()
    data["model"]["source"] = str(tmp_path / "t")
    data["data"].update(eval_samples=20, calibration_samples=32)
    data["passes"][0]["train_steps"] = 2
    data["passes"][1].update(train_steps=2, sampling_steps=2)
    manifest = compile_recipe(parse_recipe(data, "digits.yaml"), tmp_path / "bundle")
    nfes = [p["metrics"]["nfe"] for p in manifest["passes"]]
    assert nfes == [8.0, 4.0, 2.0, 2.0]  # teacher CFG, guidance-distilled, consistency, + int8
    assert manifest["passes"][-1]["details"]["quantized_layers"] > 0
    folder = tmp_path / "bundle" / "pipeline"
    reloaded = load_diffusion_model(folder)
    assert sum(type(m).__name__ == "Int8Linear" for m in reloaded.modules()) > 0
    assert manifest["verification"]["onnx"]["sqnr_db"] > 30


def test_recipe_rejects_text_corpus_for_diffusers() -> None:
    data = {"model": {"adapter": "diffuser"}}
    with pytest.raises(RecipeError, match="model.adapter: 'diffuser' is not one of"):
        parse_recipe(data, "r.yaml")


def test_the_plain_onnx_exporter_verifies_a_denoiser(tmp_path: Path, adapter, data) -> None:
    """A denoiser's graph takes a noisy sample and a timestep, not the batch's images: the
    plain `onnx` export is verified on the inputs the batch makes (it fed ORT nothing before)."""
    from compressor.exporters.onnx.onnx import OnnxExporter
    from compressor.passes.quantize.quantize import QuantizePass, quantize_config

    model = (
        QuantizePass(quantize_config(method="int8"))
        .run(tiny_teacher(), make_ctx(tiny_teacher(), adapter, data))
        .model
    )
    ectx = ExportContext(target=TARGETS["cpu"], adapter=adapter, data=data, reference_model=model)
    res = OnnxExporter().export(model, ectx, tmp_path)
    report = res.verification["onnx"]
    assert report["cases"] >= 2 and report["min_cosine"] > 0.999 and report["max_abs_error"] < 1e-3
