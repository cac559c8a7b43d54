"""TensorRT build scripts and commands (TensorRT itself is not installed here)."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from compressor.app.cli import main
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext
from compressor.exporters.tensorrt import (
    ShapeProfile,
    TensorRTBuildConfig,
    TensorRTExporter,
    build_engine,
    build_script,
    shape_profiles,
    trtexec_command,
)
from compressor.targets import get_target

BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _profiles(batch=(1, 8, 32), seq=(16, 128, 256)) -> dict[str, ShapeProfile]:
    return {n: ShapeProfile((batch[0], seq[0]), (batch[1], seq[1]), (batch[2], seq[2])) for n in BERT_INPUTS}


def test_trtexec_command_per_target() -> None:
    a100 = trtexec_command(get_target("a100"), "model.qdq.onnx", _profiles(), False, "timing.cache", 4096)
    assert a100.startswith("trtexec --onnx=model.qdq.onnx --saveEngine=model_a100.plan --stronglyTyped ")
    assert "--minShapes=input_ids:1x16,attention_mask:1x16,token_type_ids:1x16" in a100
    assert "--optShapes=input_ids:8x128,attention_mask:8x128,token_type_ids:8x128" in a100
    assert "--maxShapes=input_ids:32x256,attention_mask:32x256,token_type_ids:32x256" in a100
    assert "--timingCacheFile=timing.cache" in a100 and "--memPoolSize=workspace:4096M" in a100
    assert "--sparsity" not in a100  # only for 2:4 bundles
    assert "--int8" not in a100 and "--fp16" not in a100  # strongly typed: the Q/DQ graph decides
    h100 = trtexec_command(get_target("h100"), "model.qdq.onnx", _profiles(), True, "t.cache", 1024)
    assert "--saveEngine=model_h100.plan" in h100 and h100.count("--sparsity=enable") == 1
    assert "--memPoolSize=workspace:1024M" in h100
    with pytest.raises(PlanError, match="target 'cpu' has no TensorRT engine"):
        trtexec_command(get_target("cpu"), "model.qdq.onnx", _profiles(), False, "t.cache", 1024)


def test_build_scripts_check_the_machine_and_orin_says_jetson() -> None:
    a100 = build_script(get_target("a100"), "model.qdq.onnx", _profiles(), False, "timing.cache", 4096)
    h100 = build_script(get_target("h100"), "model.qdq.onnx", _profiles(), True, "timing.cache", 4096)
    orin = build_script(get_target("orin"), "model.qdq.onnx", _profiles(), True, "timing.cache", 4096)
    assert a100.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in a100
    assert '!= "8.0"' in a100 and '!= "9.0"' in h100  # compute capability of the target GPU
    assert "must run on the Jetson" in orin and "/etc/nv_tegra_release" in orin
    assert "Jetson" not in a100 and "Jetson" not in h100
    assert "--sparsity=enable" in orin and "--sparsity" not in a100


def test_build_script_runs_trtexec_with_the_command(tmp_path: Path) -> None:
    """Run the script with a stand-in trtexec that records its arguments."""
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args.txt"\n')
    fake.chmod(0o755)
    target = get_target("a100")
    script = tmp_path / "bundle" / "build_engine_a100.sh"
    script.parent.mkdir()
    script.write_text(build_script(target, "model.qdq.onnx", _profiles(), True, "timing.cache", 2048))
    env = {**os.environ, "TRTEXEC": str(fake), "COMPRESSOR_SKIP_TARGET_CHECK": "1"}
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    args = (fake.parent / "args.txt").read_text().split()
    want = trtexec_command(target, "model.qdq.onnx", _profiles(), True, "timing.cache", 2048).split()[1:]
    assert args == want
    missing = {**env, "TRTEXEC": str(tmp_path / "nope")}
    run = subprocess.run(["bash", str(script)], env=missing, capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "trtexec not found" in run.stderr
    orin = tmp_path / "bundle" / "build_engine_orin.sh"
    orin.write_text(build_script(get_target("orin"), "model.qdq.onnx", _profiles(), True, "t.cache", 2048))
    if not Path("/etc/nv_tegra_release").exists():
        env.pop("COMPRESSOR_SKIP_TARGET_CHECK")
        run = subprocess.run(["bash", str(orin)], env=env, capture_output=True, text=True, check=False)
        assert run.returncode == 2 and "must be built on the device" in run.stderr


def _onnx_with_inputs(path: Path, dims: list[object]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph), str(path))


def test_shape_profiles_from_the_onnx_inputs(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _onnx_with_inputs(path, ["batch", "sequence", 64])
    profiles = shape_profiles(path, {"batch": (1, 4, 16), "sequence": (8, 64, 128)})
    assert profiles == {"x": ShapeProfile((1, 8, 64), (4, 64, 64), (16, 128, 64))}
    _onnx_with_inputs(path, ["batch", "height"])
    with pytest.raises(ExportError, match="dynamic dimension 'height' with no range"):
        shape_profiles(path, {"batch": (1, 4, 16)})
    _onnx_with_inputs(path, [2, 3])  # nothing dynamic: no profile needed
    assert shape_profiles(path, {}) == {}


def test_config_cpu_target_missing_qdq_and_missing_tensorrt(tiny_ctx, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"exports\[1\]\.batch: \[8, 4, 16\] must be \[min, opt, max\]"):
        TensorRTBuildConfig(batch=(8, 4, 16)).validate("exports[1]")
    with pytest.raises(PlanError, match="tensorrt has no engine for target 'cpu'"):
        TensorRTExporter().check(get_target("cpu"))
    TensorRTExporter().check(get_target("orin"))
    adapter, model, ctx = tiny_ctx
    ectx = ExportContext(target=get_target("a100"), adapter=adapter, data=ctx.data, reference_model=model)
    with pytest.raises(RecipeError, match="add `- format: onnx_qdq` before `- format: tensorrt`"):
        TensorRTExporter().export(model, ectx, tmp_path)
    assert list(tmp_path.iterdir()) == []
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ExportError, match="needs the tensorrt Python package"):
            build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", {}, False, None, 1024)


def test_compile_tiny_bert_for_a100_writes_qdq_onnx_and_build_script(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = {
        "name": "tiny-trt",
        "target": "a100",
        "model": {"source": str(tiny_bert_dir)},
        "data": {
            "calibration_samples": 8,
            "train_samples": 0,
            "eval_samples": 8,
            "max_length": 16,
            "batch_size": 8,
        },
        "passes": [
            {"pass": "quantize", "targets": ["encoder.*"], "activations": "static_per_tensor"},
        ],
        "exports": [
            {"format": "onnx_qdq", "verify_batch_sizes": [1, 4], "verify_lengths": [8, 16]},
            {"format": "tensorrt", "batch": [1, 8, 64], "sequence": [1, 64, 128]},
        ],
        "evaluation": {"run_bench": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(path), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"]["onnx_qdq"] == "model.qdq.onnx"
    assert manifest["artifacts"]["tensorrt_build"] == "build_engine_a100.sh"
    assert manifest["verification"]["onnx_qdq"]["min_cosine"] >= 0.999
    build = manifest["verification"]["tensorrt_build"]
    assert "--maxShapes=input_ids:64x128,attention_mask:64x128,token_type_ids:64x128" in build["command"]
    assert build["sparse_24"] is False and "--sparsity" not in build["command"]
    assert build["engine_built"] is False and build["not_built_because"]  # no TensorRT / GPU here
    script = out / "build_engine_a100.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert build["command"].split(" ", 1)[1] in script.read_text()
    assert "build_engine_a100.sh" in manifest["files"]
    # the same recipe for the cpu target is refused before any work
    recipe["target"] = "cpu"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["compile", "--recipe", str(path), "--out", str(tmp_path / "cpu")]) == 2
    assert "tensorrt has no engine for target 'cpu'" in capsys.readouterr().err
    assert not (tmp_path / "cpu").exists()


@pytest.mark.parametrize(
    ("exports", "message"),
    [
        (
            [{"format": "tensorrt"}, {"format": "onnx_qdq"}],
            r"exports\[0\]: tensorrt builds from the Q/DQ ONNX",
        ),
        ([{"format": "triton_repository"}], r"triton_repository\) serves model.onnx, which no `onnx` export"),
    ],
)
def test_missing_earlier_exports_are_refused_before_any_pass_runs(
    tiny_bert_dir: Path, exports: list, message: str
) -> None:
    from compressor.app.compile import plan
    from compressor.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "target": "a100",
            "model": {"source": str(tiny_bert_dir)},
            "passes": [{"pass": "quantize", "targets": ["encoder.*"], "activations": "static_per_tensor"}],
            "exports": exports,
        },
        "r.yaml",
    )
    with pytest.raises(RecipeError, match=message):
        plan(recipe)
