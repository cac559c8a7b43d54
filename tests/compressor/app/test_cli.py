from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compressor.app.cli import main


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_targets_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "h100" in out and "sm_90" in out and "fp8" in out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("quantize", "sparsify", "distill"):
        assert name in out


def test_validate_reports_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(tmp_path, {"target": "cpu", "passes": [{"pass": "quantize", "bits": 3}]})
    assert main(["recipe", "validate", str(bad), "--static"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "passes[0].bits: unknown key" in err and "Traceback" not in err


def test_validate_checks_the_plan_against_the_model(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = {
        "target": "cpu",
        "model": {"source": str(tiny_bert_dir)},
        "passes": [{"pass": "quantize", "targets": ["decoder.*"]}],
    }
    assert main(["recipe", "validate", str(_write(tmp_path, recipe))]) == 2
    assert "target pattern 'decoder.*' matches no Linear layer" in capsys.readouterr().err
    recipe["passes"] = [{"pass": "quantize", "targets": ["encoder.*"]}]
    assert main(["recipe", "validate", str(_write(tmp_path, recipe))]) == 0


def test_untrusted_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["compile", "--model", str(folder), "--out", str(tmp_path / "b"), "--no-bench"]) == 2
    err = capsys.readouterr().err
    # the loader's wording (compressor/adapters/hf_folder.py): names the pickle and what to do
    assert "pytorch_model.bin" in err and "safetensors" in err and "refused" in err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_compile_tiny_bert_end_to_end(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = {
        "name": "tiny",
        "target": "cpu",
        "model": {"source": str(tiny_bert_dir)},
        "data": {
            "calibration_samples": 16,
            "train_samples": 16,
            "eval_samples": 16,
            "max_length": 32,
            "batch_size": 8,
        },
        "passes": [
            {"pass": "sparsify", "targets": ["encoder.*"]},
            {"pass": "distill", "steps": 3, "lr": 1e-4, "warmup_steps": 1},
            {"pass": "quantize", "targets": ["encoder.*"], "smoothquant": True, "alpha": 0.5},
        ],
        "exports": [{"format": "onnx"}],
        "evaluation": {"bench": {"batch_sizes": [2], "seq_len": 16, "warmup": 1, "repeats": 2, "threads": 1}},
    }
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(_write(tmp_path, recipe)), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"]["onnx"] == "model.onnx" and (out / "model.onnx").is_file()
    assert [p["pass"] for p in manifest["passes"]] == ["original", "sparsify", "distill", "quantize"]
    assert manifest["passes"][1]["metrics"]["linear_sparsity"] > 0.45
    assert manifest["verification"]["onnx"]["min_cosine"] > 0.999
    bench = manifest["benchmark"]
    assert list(bench["engines"]) == ["ort_fp32", "ort"]  # the compile times the bundle's ONNX only
    row = bench["latency"][0]["engines"]
    assert row["ort"]["median_ms"] > 0 and "speedup_vs_ort_fp32" in row["ort"]
    # The engine's fidelity, measured by bench in ONNX Runtime, is what the pipeline measured in torch.
    final = manifest["passes"][-1]["metrics"]
    fid = bench["engines"]["ort"]["fidelity"]
    assert abs(fid["mean_cosine"] - final["mean_cosine"]) < 0.01, (fid, final)
    assert (out / "report.md").read_text().count("|") > 10 and "<svg" in (out / "report.html").read_text()
    text = capsys.readouterr().out
    assert "speedup vs ort_fp32" in text and "fidelity of each engine" in text
    # `compressor bench` on the bundle works on its own and checks the hashes first.
    assert (
        main(
            [
                "bench",
                str(out),
                "--batch",
                "1",
                "--seq-len",
                "8",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--json",
                str(tmp_path / "b.json"),
                "--out",
                str(tmp_path / "bench-out"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "b.json").read_text())["latency"][0]["batch"] == 1
    assert (tmp_path / "bench-out" / "report.html").is_file()
    (out / "model.onnx").write_bytes(b"tampered")
    assert main(["bench", str(out)]) == 2


def test_fidelity_floor_failure_leaves_no_bundle(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = {
        "target": "cpu",
        "model": {"source": str(tiny_bert_dir)},
        "data": {
            "calibration_samples": 8,
            "train_samples": 0,
            "eval_samples": 8,
            "max_length": 16,
            "batch_size": 8,
        },
        "passes": [{"pass": "sparsify", "targets": ["encoder.*"]}],
        "exports": [{"format": "onnx"}],
        "evaluation": {"min_mean_cosine": 0.99999, "run_bench": False},
    }
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(_write(tmp_path, recipe)), "--out", str(out)]) == 2
    assert "below evaluation.min_mean_cosine" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]  # no bundle, no partial directory


def test_fp8_for_a100_is_refused_before_any_work(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = {
        "target": "a100",
        "model": {"source": str(tiny_bert_dir)},
        "passes": [{"pass": "quantize", "method": "fp8", "targets": ["encoder.*"]}],
    }
    path = _write(tmp_path, recipe)
    assert main(["recipe", "validate", str(path)]) == 2
    assert "fp8 is not supported on target 'a100'" in capsys.readouterr().err
    assert main(["compile", "--recipe", str(path), "--out", str(tmp_path / "b")]) == 2
    assert "use target h100" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["recipe", "validate", str(path), "--target", "h100"]) == 0


def test_recover_block_distills_after_a_lossy_pass(tiny_ctx) -> None:
    from compressor.distill.config import RecoverConfig
    from compressor.passes.sparsity.sparsify import SparsifyConfig, SparsifyPass, is_24_sparse
    from compressor.pipeline import Pipeline

    adapter, model, ctx = tiny_ctx
    plain = Pipeline([SparsifyPass(SparsifyConfig(targets=("encoder.*",)))])
    recovered = Pipeline(
        [
            SparsifyPass(
                SparsifyConfig(
                    targets=("encoder.*",), recover=RecoverConfig(steps=30, lr=1e-3, warmup_steps=2)
                )
            )
        ]
    )
    import copy

    a = plain.run(copy.deepcopy(model), ctx)
    b = recovered.run(copy.deepcopy(model), ctx)
    details = recovered.results[-1].details["recover"]
    assert details["steps"] == 30
    assert recovered.results[-1].metrics["mean_cosine"] > plain.results[-1].metrics["mean_cosine"]
    for m in (a, b):
        for name, layer in m.named_modules():
            if name.startswith("encoder") and isinstance(layer, torch.nn.Linear):
                assert is_24_sparse(layer.weight)


def test_the_cli_and_every_exporter_import_without_triton() -> None:
    """triton is an optional extra (kernels): a CPU-only install must still compile."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import compressor.app.cli, compressor.app.compile, compressor.exporters, compressor.passes\n"
        "from compressor.exporters import EXPORTERS; print(len(EXPORTERS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("target", ["a100", "h100", "orin"])
def test_default_recipe_compiles_for_each_gpu_target(
    target: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """`compressor compile --target T` on the default recipe writes a bundle for T: per-token int8
    (what the GPU kernels run) in place of the CPU's per-tensor scheme, the ONNX verified."""
    from compressor.recipe import load_recipe

    recipe = load_recipe("minilm-cpu-int8").to_dict()  # the default, made small for a test
    recipe["data"].update(
        calibration_samples=16, train_samples=16, eval_samples=16, max_length=32, batch_size=8
    )
    recipe["passes"][0].update(alpha_grid=[0.8], calibration_batches=1)
    recipe["passes"][1].update(steps=2, warmup_steps=1)
    path = _write(tmp_path, recipe)
    out = tmp_path / "bundle"
    args = ["compile", "--recipe", str(path), "--target", target, "--model", str(tiny_bert_dir)]
    assert main(args + ["--out", str(out), "--no-bench"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    arch = {"a100": "sm_80", "h100": "sm_90", "orin": "sm_87"}[target]
    assert m["target"] == {"name": target, "arch": arch, "device": "cuda"}
    assert m["passes"][1]["details"]["activation_scheme"] == "dynamic_per_token"
    assert m["artifacts"]["onnx"] == "model.onnx" and m["verification"]["onnx"]["min_cosine"] > 0.999
