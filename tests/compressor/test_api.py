"""The Python API (``compressor.api``): a recipe applied in memory, exported, benched; the
same metrics as ``compile_recipe`` on the same recipe and seed."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from compressor import api
from compressor.adapters.base import DataSplits
from compressor.errors import CompressorError
from compressor.manifest import Manifest, read_manifest
from compressor.recipe import Recipe, parse_recipe


def _tiny_recipe(source: Path) -> Recipe:
    return parse_recipe(
        {
            "name": "tiny-api",
            "target": "cpu",
            "seed": 3,
            "model": {"source": str(source)},
            "data": {
                "calibration_samples": 16,
                "train_samples": 0,
                "eval_samples": 16,
                "max_length": 32,
                "batch_size": 8,
            },
            "passes": [
                {"pass": "sparsify", "targets": ["encoder.layer.0.intermediate.*"]},
                {"pass": "quantize", "targets": ["encoder.*"], "smoothquant": True, "alpha": 0.5},
            ],
            "exports": [{"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [16]}],
            "evaluation": {
                "run_bench": True,
                "bench": {"batch_sizes": [1], "seq_len": 16, "threads": 1, "warmup": 1, "repeats": 2},
            },
        },
        "tiny-api.yaml",
    )


def _metrics(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pass's fidelity and size figures, without its wall-clock times."""
    return [{k: v for k, v in p["metrics"].items() if not k.endswith("_s")} for p in passes]


def test_compress_export_bench_match_compile(tiny_bert_dir: Path, tmp_path: Path) -> None:
    recipe = _tiny_recipe(tiny_bert_dir)
    stages: list[str] = []
    c = api.compress(recipe, on_stage=stages.append)
    assert stages[0] == "planning tiny-api for target cpu" and "pass 2/2: quantize" in stages
    assert [r.name for r in c.results[1:]] == ["sparsify", "quantize"]
    assert 0.9 < c.metrics["mean_cosine"] < 1.0  # compressed, and still close to the teacher
    with torch.no_grad():  # the model in memory is the compressed one, the teacher the original
        batch = c.data.eval[0]
        student, teacher = c.adapter.forward(c.model, batch), c.adapter.forward(c.teacher, batch)
    assert 0.9 < float(nn.functional.cosine_similarity(student, teacher).mean()) < 1.0

    manifest = api.export(c, tmp_path / "api-bundle")
    assert manifest == read_manifest(tmp_path / "api-bundle")  # what was written, not a copy
    assert Manifest.from_dict(manifest).to_json() == (tmp_path / "api-bundle" / "manifest.json").read_text()
    assert manifest["benchmark"]["latency"][0]["batch"] == 1  # the recipe's own bench ran
    assert (tmp_path / "api-bundle" / "report.md").is_file()

    compiled = api.compile_recipe(recipe, tmp_path / "compiled")
    assert _metrics(compiled["passes"]) == _metrics(manifest["passes"])  # same recipe, same seed
    assert compiled["verification"]["onnx"] == manifest["verification"]["onnx"]
    assert list(compiled) == list(manifest)  # the same top-level keys, in the same order

    result = api.bench(
        tmp_path / "api-bundle", api.BenchConfig(batch_sizes=(1,), seq_len=16, threads=1, warmup=1, repeats=2)
    )
    assert set(result["engines"]) == {"ort_fp32", "ort"}
    fid = result["engines"]["ort"]["fidelity"]
    assert fid["texts"] == sum(manifest["data"]["eval"].values()) == 48  # 16 per evaluation domain
    assert 0.9 < fid["mean_cosine"] < 1.0
    json.dumps(result)  # what bench --json writes


def test_compress_a_module_in_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    batches = [{"input": torch.randn(8, 16)} for _ in range(4)]
    data = DataSplits(calibration=batches[:2], train=batches[:2], eval=batches[2:])
    recipe = parse_recipe(
        {
            "name": "mlp",
            "target": "cpu",
            "passes": [{"pass": "quantize", "targets": ["*"]}],
            "exports": [{"format": "onnx"}],
        },
        "mlp.yaml",
    )
    c = api.compress(recipe, model=net, data=data)
    assert c.adapter.name == "module" and c.metrics["mean_cosine"] > 0.99
    assert c.model is not net  # the caller's module is left as it was
    manifest = api.export(c, tmp_path / "mlp")
    assert manifest["model"]["adapter"] == "module" and "benchmark" not in manifest
    assert manifest["artifacts"] == {"onnx": "model.onnx"}
    with pytest.raises(CompressorError, match="model= needs data="):
        api.compress(recipe, model=net)
    with pytest.raises(CompressorError, match="bench times sentence-embedding bundles; this one uses module"):
        api.bench(tmp_path / "mlp")


def _held_model(tiny_bert_dir: Path) -> tuple[Any, Any, Any, DataSplits]:
    """What a benchmark holds: the adapter that loaded the teacher, the frozen teacher, a
    student changed in memory (depth cut to 1 of 2 layers, as a prune would leave it) and
    data built once."""
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.recipe import DataSpec

    adapter = HFEncoderAdapter()
    teacher = adapter.load(str(tiny_bert_dir)).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.encoder.layer = student.encoder.layer[:1]
    spec = DataSpec(calibration_samples=16, train_samples=0, eval_samples=16, max_length=32, batch_size=8)
    return adapter, teacher, student, adapter.make_data(spec, seed=0)


def _held_recipe(tiny_bert_dir: Path, passes: list[dict[str, Any]], **evaluation: Any) -> Recipe:
    return parse_recipe(
        {
            "name": "held",
            "model": {"source": str(tiny_bert_dir)},
            "passes": passes,
            "exports": [{"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [16]}],
            "evaluation": {"run_bench": False, **evaluation},
        },
        "held.yaml",
    )


def test_compress_a_held_model_with_its_adapter_data_and_teacher(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from compressor.adapters.hf_encoder import embedding_fidelity

    adapter, teacher, student, splits = _held_model(tiny_bert_dir)
    recipe = _held_recipe(
        tiny_bert_dir, [{"pass": "quantize", "targets": ["encoder.*"], "smoothquant": True}]
    )
    c = api.compress(recipe, model=student, adapter=adapter, data=splits, teacher=teacher)
    assert c.data is splits and c.teacher is teacher and c.adapter is adapter
    assert c.model is not student and len(c.model.encoder.layer) == 1  # a copy of the held model
    assert isinstance(student.encoder.layer[0].attention.self.query, nn.Linear)  # left as it was

    # Measured against the given teacher, not a copy of the model: the 1-layer student starts off it.
    held = embedding_fidelity(adapter.embed(student, splits.eval), adapter.embed(teacher, splits.eval))
    assert c.results[0].metrics["mean_cosine"] == pytest.approx(held["mean_cosine"], abs=1e-6)
    assert held["mean_cosine"] < 0.9  # a copy of the model as teacher would give 1.0
    final = adapter.metrics(c.model, teacher, splits.eval)
    assert c.metrics["mean_cosine"] == pytest.approx(final["mean_cosine"], abs=1e-6)
    assert abs(c.metrics["mean_cosine"] - held["mean_cosine"]) < 0.02  # the cut costs it, not int8

    manifest = api.export(c, tmp_path / "held")
    assert manifest["data"] == splits.info and manifest["model"]["adapter"] == "hf-encoder"
    assert manifest["verification"]["onnx"]["min_cosine"] > 0.99  # the 1-layer int8 model, exported


def test_compress_checks_the_plan_on_the_held_model_before_any_pass(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compressor.app.compile import plan
    from compressor.passes import PASSES

    adapter, teacher, student, splits = _held_model(tiny_bert_dir)
    passes = [
        {"pass": "sparsify", "targets": ["encoder.layer.0.intermediate.*"]},
        {"pass": "quantize", "targets": ["encoder.layer.1.*"]},
    ]
    recipe = _held_recipe(tiny_bert_dir, passes)
    plan(recipe, adapter, teacher)  # legal on the 2-layer model the recipe names ...
    ran: list[str] = []
    monkeypatch.setattr(PASSES["sparsify"], "run", lambda *a: ran.append("sparsify"))
    stages: list[str] = []
    with pytest.raises(CompressorError, match="target pattern 'encoder.layer.1.[*]' matches no Linear layer"):
        api.compress(
            recipe, model=student, adapter=adapter, data=splits, teacher=teacher, on_stage=stages.append
        )
    assert ran == [] and not any(s.startswith("pass ") for s in stages)  # ... refused on the held one first

    quantize = [{"pass": "quantize", "targets": ["encoder.*"]}]
    floored = _held_recipe(tiny_bert_dir, quantize, min_mean_cosine=0.5)
    with pytest.raises(CompressorError, match="evaluation.min_mean_cosine is a fidelity floor"):
        api.compress(floored, model=student, adapter=adapter, data=splits, teacher=teacher, measure=False)
    c = api.compress(
        _held_recipe(tiny_bert_dir, quantize), model=student, adapter=adapter, data=splits, measure=False
    )
    assert c.metrics == {} and [r.name for r in c.results] == ["original", "quantize"]
    assert c.teacher is not student and len(c.teacher.encoder.layer) == 1  # no teacher given: the held model


def test_load_recipe_overrides_target_and_model(tmp_path: Path) -> None:
    recipe = api.load_recipe("minilm-cpu-int8", target="a100", model=str(tmp_path))
    assert recipe.target == "a100" and recipe.model.source == str(tmp_path)


def _benchmark(name: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_pruned_shapes_benchmark_compiles_each_shape_from_a_recipe() -> None:
    bench = _benchmark("pruned_shapes_cpu")
    unpruned, pruned = bench.shape_recipe(6, 1536), bench.shape_recipe(4, 1024)
    assert [p.name for p in unpruned.passes] == ["quantize"]
    assert [p.name for p in pruned.passes] == ["prune", "quantize"]
    assert (pruned.passes[0].config.layers, pruned.passes[0].config.ffn) == (4, 1024)
    assert [e.format for e in pruned.exports] == ["onnx"] and not pruned.evaluation.run_bench
    assert bench.parse_args(["--shapes", "6x1536", "--repeats", "3"]).repeats == 3


def test_compression_benchmark_rows_run_after_their_base() -> None:
    bench = _benchmark("compression_minilm")
    distill = {"steps": 7, "lr": 1e-3, "warmup_steps": 1}
    methods = bench.build_methods(lambda target, *e: (target, e), str, str, distill, {}, {})
    keys = [m.key for m in methods]
    assert len(keys) == len(set(keys)) == 19 and keys[0] == "fp32"
    assert all(keys.index(m.base) < keys.index(m.key) for m in methods[1:])
    assert "(7 steps)" in methods[keys.index("ours_24_sparsegpt_distill")].label
