"""The AOTInductor package: one small end-to-end compile (its AOTInductor build on this CPU
is the slow part, tens of seconds), then round trips and failures checked against it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.adapters.base import Batch, DataSplits
from compressor.adapters.hf_encoder import HFEncoderAdapter
from compressor.bundle import verify_bundle
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.aoti import AotiExportConfig, AotiExporter, dynamic_shapes
from compressor.exporters.base import ExportContext
from compressor.exporters.torch_export import TorchExportExporter
from compressor.kernels.int8_linear import Int8Linear
from compressor.recipe import parse_recipe
from compressor.targets import get_target


@pytest.fixture(scope="module")
def bundle(aoti_bundle):
    return aoti_bundle


def _cases(adapter: HFEncoderAdapter, sizes: tuple[int, ...], lengths: tuple[int, ...]) -> list[Batch]:
    texts = [f"held-out sentence {i} about {'compilers ' * (i % 7)} and int8 kernels" for i in range(16)]
    batch = adapter.tokenize(texts, max_length=64, pad_to_max=True)
    return adapter.verification_cases(batch, sizes, lengths)


def _cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


@pytest.mark.slow
def test_manifest_lists_the_package_and_the_triton_repository(bundle) -> None:
    out, manifest, _ = bundle
    assert manifest["artifacts"]["aoti"] == "model.pt2"
    assert manifest["artifacts"]["triton_repository"] == "triton_repository"
    assert manifest["artifacts"]["onnx"] == "model.onnx"
    files = manifest["files"]
    for rel in ("model.pt2", "triton_repository/model/config.pbtxt", "triton_repository/model/1/model.onnx"):
        assert files[rel]["bytes"] > 0, rel
    assert files["triton_repository/model/1/model.onnx"]["sha256"] == files["model.onnx"]["sha256"]
    verify_bundle(out)  # every hash, the repository's files included
    report = manifest["verification"]["aoti"]
    assert report["cases"] == 4 and report["min_cosine"] > 0.999 and report["compile_seconds"] > 0
    assert report["max_length"] == 128  # the tiny BERT's max_position_embeddings
    assert manifest["verification"]["triton_repository"]["max_batch_size"] == 32
    assert not list(out.glob(".partial-*"))


@pytest.mark.slow
def test_round_trip_matches_torch_at_new_shapes(bundle) -> None:
    out, _, adapter = bundle
    model = adapter.exported
    assert model is not None and any(isinstance(m, Int8Linear) for m in model.modules())
    runner = torch._inductor.aoti_load_package(str(out / "model.pt2"))
    names = ("input_ids", "attention_mask", "token_type_ids")
    # Neither the traced example (2 x 16) nor the exporter's own verification shapes.
    for case in _cases(adapter, (3, 7), (11, 29)):
        with torch.no_grad():
            ref = adapter.forward(model, case)
            got = runner(*(case[n] for n in names))
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.shape == ref.shape
        assert _cosine_min(got, ref) > 0.999


@pytest.mark.slow
def test_dynamic_batch(bundle) -> None:
    out, _, adapter = bundle
    runner = torch._inductor.aoti_load_package(str(out / "model.pt2"))
    names = ("input_ids", "attention_mask", "token_type_ids")
    for case in _cases(adapter, (1, 16), (40,)):
        with torch.no_grad():
            got = runner(*(case[n] for n in names))
            ref = adapter.forward(adapter.exported, case)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.shape == (case["input_ids"].shape[0], 32)
        assert _cosine_min(got, ref) > 0.999


@pytest.mark.slow
def test_exported_program_round_trip(bundle) -> None:
    """torch_export: the saved ExportedProgram reloads and computes what the compressed model does,
    at shapes other than the traced and verified ones."""
    out, manifest, adapter = bundle
    assert manifest["artifacts"]["torch_export"] == "model.exported.pt2"
    report = manifest["verification"]["torch_export"]
    assert report["min_cosine"] > 0.9999 and report["inputs"] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    module = torch.export.load(str(out / "model.exported.pt2")).module()
    for case in _cases(adapter, (3, 12), (7, 33)):
        with torch.no_grad():
            ref = adapter.forward(adapter.exported, case)
            got = module(*(case[n] for n in report["inputs"]))
        assert got.shape == ref.shape and _cosine_min(got, ref) > 0.9999


class NegatingAdapter(HFEncoderAdapter):
    """An adapter whose torch reference disagrees with what gets compiled."""

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return -super().forward(model, batch)


def _negating_context(adapter: HFEncoderAdapter) -> ExportContext:
    """An export context whose torch reference is the negated model: every export must fail."""
    neg = NegatingAdapter()
    neg.tokenizer = adapter.tokenizer
    held_out = _cases(adapter, (8,), (64,))[0]
    data = DataSplits(calibration=[held_out], train=[], eval=[held_out], info={})
    return ExportContext(target=get_target("cpu"), adapter=neg, data=data, reference_model=adapter.exported)


@pytest.mark.slow
def test_disagreement_fails_and_leaves_no_package(bundle, tmp_path: Path, monkeypatch) -> None:
    out, _, adapter = bundle
    # Reuse the package compiled above (a real one) instead of compiling the same model again.
    monkeypatch.setattr(
        torch._inductor,
        "aoti_compile_and_package",
        lambda ep, package_path, inductor_configs: shutil.copy(out / "model.pt2", package_path),
    )
    ctx = _negating_context(adapter)
    with pytest.raises(
        ExportError, match=r"model.pt2: the AOTInductor package disagrees with torch: min cosine"
    ):
        AotiExporter().export(adapter.exported, ctx, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_exported_program_disagreement_fails_and_leaves_nothing(bundle, tmp_path: Path) -> None:
    _, _, adapter = bundle
    ctx = _negating_context(adapter)
    with pytest.raises(
        ExportError, match=r"model.exported.pt2: the saved ExportedProgram disagrees with torch"
    ):
        TorchExportExporter().export(adapter.exported, ctx, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_plan_and_config_errors() -> None:
    with pytest.raises(PlanError, match="aoti: target 'orin' does not run AOTInductor packages"):
        AotiExporter().check(get_target("orin"))
    with pytest.raises(PlanError, match="max_autotune: autotuning only applies to CUDA targets"):
        AotiExporter(AotiExportConfig(max_autotune=True)).check(get_target("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match="aoti: target 'h100' needs the program captured on a CUDA GPU"):
            AotiExporter().check(get_target("h100"))
        with pytest.raises(
            PlanError, match="torch_export: target 'a100' needs the program captured on a CUDA"
        ):
            TorchExportExporter().check(get_target("a100"))
    with pytest.raises(RecipeError, match=r"exports\[0\].verify_batch_sizes: \[1, 4096\] must be"):
        parse_recipe({"exports": [{"format": "aoti", "verify_batch_sizes": [1, 4096]}]})
    with pytest.raises(RecipeError, match=r"exports\[0\].file: 'model.so' must be a plain file name ending"):
        parse_recipe({"exports": [{"format": "aoti", "file": "model.so"}]})
    with pytest.raises(RecipeError, match=r"exports\[0\].file: 'a/b.pt2' must be a plain file name ending"):
        parse_recipe({"exports": [{"format": "torch_export", "file": "a/b.pt2"}]})


def test_dynamic_shapes_share_one_dim_per_axis_name() -> None:
    axes = {n: {0: "batch", 1: "sequence"} for n in ("a", "b")}
    shapes = dynamic_shapes(("a", "b"), axes, max_batch=64, max_length=128)
    assert shapes["a"][0] is shapes["b"][0] and shapes["a"][1] is shapes["b"][1]
    assert shapes["a"][0].max == 64 and shapes["a"][1].max == 128 and shapes["a"][1].min == 1


@pytest.mark.slow
def test_native_runner_runs_the_bundle_package(bundle, native_runner: Path) -> None:
    """compressor-run (C++, libtorch) loads the bundle's package and computes what torch does."""
    import numpy as np

    from compressor.app.native import run_runner
    from compressor.exporters.runner_inputs import RUNNER_INPUTS

    out, _, adapter = bundle
    lines = (out / RUNNER_INPUTS).read_text().split("\n")
    names = [line.split()[0] for line in lines if line]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    inputs = {}
    for line in filter(None, lines):
        name, dtype, ndim, *rest = line.split()
        shape, file = [int(d) for d in rest[: int(ndim)]], rest[int(ndim)]
        inputs[name] = torch.from_numpy(np.fromfile(out / file, dtype=np.dtype(dtype)).reshape(shape))
    with torch.no_grad():
        expected = adapter.forward(adapter.exported, inputs)
    result = run_runner(native_runner, out, iters=5, warmup=1, threads=1)
    assert result["batch"] == inputs["input_ids"].shape[0]
    assert result["output0_sum"] == pytest.approx(float(expected.sum()), rel=1e-4, abs=1e-4)
    assert 0 < result["p50_ms"] <= result["p99_ms"]
