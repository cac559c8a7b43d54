"""compressor-run (C++, libtorch): built with CMake, run on an AOTInductor package."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.app.native import run_runner
from compressor.errors import CompressorError
from compressor.exporters.runner_inputs import write_runner_inputs


@pytest.fixture(scope="module")
def runner(native_runner: Path) -> Path:
    return native_runner


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A bundle-shaped folder: manifest.json naming an AOTInductor package and its inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    ep = torch.export.export(model, (x,))
    root = tmp_path_factory.mktemp("bundle")
    (root / "aoti").mkdir()
    torch._inductor.aoti_compile_and_package(ep, package_path=str(root / "aoti" / "model.pt2"))
    write_runner_inputs(root / "aoti", {"x": x})
    (root / "manifest.json").write_text(json.dumps({"artifacts": {"aoti": "aoti/model.pt2"}}))
    with torch.no_grad():
        return root, model(x)


@pytest.mark.slow
def test_runner_runs_the_package_and_reports_latency(runner: Path, bundle) -> None:
    root, expected = bundle
    result = run_runner(runner, root, iters=20, warmup=2, threads=1)
    # it ran OUR model on OUR inputs: the output checksum is torch's
    assert result["output0_sum"] == pytest.approx(float(expected.sum()), rel=1e-4, abs=1e-4)
    assert result["outputs"] == 1 and result["batch"] == 4 and result["iters"] == 20
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert result["throughput"] == pytest.approx(
        4 * 1000.0 / result["p50_ms"], rel=1e-3
    )  # both from the unrounded median


@pytest.mark.slow
def test_runner_errors_name_the_problem(runner: Path, bundle, tmp_path: Path) -> None:
    root, _ = bundle
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": {"onnx": "model.onnx"}}))
    with pytest.raises(CompressorError, match="no artifacts.aoti"):
        run_runner(runner, tmp_path)
    bad = subprocess.run([str(runner), str(root), "--iters", "many"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--iters needs an integer" in bad.stderr
    shutil.copytree(root, tmp_path / "b")
    (tmp_path / "b" / "aoti" / "runner_input_x.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CompressorError, match="runner_input_x.bin: 8 bytes, expected 256"):
        run_runner(runner, tmp_path / "b")
