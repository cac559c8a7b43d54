"""The Triton Inference Server repository: config.pbtxt checked against Triton's own schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from torch import nn

from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext
from compressor.exporters.onnx.onnx import OnnxExportConfig, OnnxExporter, ort_session
from compressor.exporters.triton_repository import (
    TritonRepositoryConfig,
    TritonRepositoryExporter,
    batching,
    onnx_io,
    render_config_pbtxt,
)
from compressor.manifest import sha256_file
from compressor.passes.quantize.quantize import QuantizePass, quantize_config
from compressor.planning import PlanState, plan_exports
from compressor.recipe import Recipe, parse_recipe
from compressor.targets import get_target


def model_config_pb2() -> Any:
    """Triton's ModelConfig schema as tritonclient ships it. Loaded from its file: the module needs
    only protobuf, while importing the ``tritonclient.grpc`` package also demands grpcio."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _export(tiny_ctx, out: Path, target: str = "cpu", **cfg):
    adapter, model, ctx = tiny_ctx
    q = (
        QuantizePass(quantize_config(targets=("encoder.*",), smoothquant=True, alpha=0.5))
        .run(model, ctx)
        .model
    )
    ectx = ExportContext(target=get_target(target), adapter=adapter, data=ctx.data, reference_model=q)
    OnnxExporter(OnnxExportConfig(verify_batch_sizes=(2,), verify_lengths=(16,))).export(q, ectx, out)
    res = TritonRepositoryExporter(TritonRepositoryConfig(**cfg)).export(q, ectx, out)
    return q, ectx, res


def _parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def test_config_follows_tritons_schema_and_the_onnx_graph(tiny_ctx, tmp_path: Path) -> None:
    _, _, res = _export(tiny_ctx, tmp_path, model_name="minilm_int8", max_queue_delay_microseconds=250)
    assert res.artifacts == {"triton_repository": "triton_repository"}
    cfg = _parse(tmp_path / "triton_repository" / "minilm_int8" / "config.pbtxt")
    pb2 = model_config_pb2()
    assert cfg.name == "minilm_int8" and cfg.backend == "onnxruntime"
    # No recipe in the context: a default recipe's serving sizes (bench 1, 32); the onnx export's
    # verification shapes (1, 3, 8) are not serving batches.
    assert cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb2.ModelInstanceGroup.KIND_CPU)]
    # Inputs exactly the ONNX graph's: names in order, int64, dynamic length (batch axis is Triton's).
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    inits = {t.name for t in graph.initializer}
    assert [i.name for i in cfg.input] == [i.name for i in graph.input if i.name not in inits]
    assert [i.name for i in cfg.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for i in cfg.input:
        assert i.data_type == pb2.TYPE_INT64 and list(i.dims) == [-1]
    (out,) = cfg.output
    assert out.name == "sentence_embedding" and out.data_type == pb2.TYPE_FP32
    # The tracer leaves the embedding width symbolic in the graph, so the config says -1 too.
    graph_dims = [d.dim_value or -1 for d in graph.output[0].type.tensor_type.shape.dim]
    assert len(graph_dims) == 2 and list(out.dims) == graph_dims[1:]
    report = res.verification["triton_repository"]
    assert report["max_batch_size"] == 32 and report["instance_kind"] == "KIND_CPU"
    assert report["min_cosine"] > 0.999


def test_repository_model_is_the_bundle_onnx_and_runs(tiny_ctx, tmp_path: Path) -> None:
    _, ectx, res = _export(tiny_ctx, tmp_path)
    served = tmp_path / "triton_repository" / "model" / "1" / "model.onnx"
    assert sha256_file(served) == sha256_file(tmp_path / "model.onnx")
    assert res.verification["triton_repository"]["model_sha256"] == sha256_file(served)
    batch = ectx.adapter.verification_cases(ectx.data.eval[0], (5,), (20,))[0]
    feed = {k: v.numpy() for k, v in batch.items()}
    served_out = ort_session(served).run(None, feed)[0]
    bundle_out = ort_session(tmp_path / "model.onnx").run(None, feed)[0]
    assert served_out.shape == (5, 32)
    np.testing.assert_array_equal(served_out, bundle_out)
    # A second repository entry with the same name is refused and leaves the first whole.
    with pytest.raises(RecipeError, match="two triton_repository exports name the model 'model'"):
        TritonRepositoryExporter().export(ectx.reference_model, ectx, tmp_path)
    assert sha256_file(served) == sha256_file(tmp_path / "model.onnx")


def test_gpu_target_gets_gpu_instances(tiny_ctx, tmp_path: Path) -> None:
    _, _, res = _export(tiny_ctx, tmp_path, target="h100", max_batch_size=16, preferred_batch_sizes=(4, 16))
    cfg = _parse(tmp_path / "triton_repository" / "model" / "config.pbtxt")
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2().ModelInstanceGroup.KIND_GPU]
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]


def test_without_onnx_export_nothing_is_written(tiny_ctx, tmp_path: Path) -> None:
    adapter, model, ctx = tiny_ctx
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=model)
    with pytest.raises(RecipeError, match=r"add `- format: onnx` before `- format: triton_repository`"):
        TritonRepositoryExporter().export(model, ectx, tmp_path)
    assert list(tmp_path.iterdir()) == []


def check_recipe_exports(recipe: Recipe) -> None:
    """The plan-time checks of ``recipe``'s exports, on a model with no Linear layer to judge."""
    from compressor.exporters import EXPORTERS

    state = PlanState(get_target(recipe.target), cast(Any, None), nn.Identity(), linears={})
    plan_exports(state, [EXPORTERS[e.format](e.config) for e in recipe.exports])


def _recipe(exports: list[dict[str, Any]]) -> Any:
    return parse_recipe(
        {"target": "cpu", "exports": exports, "evaluation": {"bench": {"batch_sizes": [2, 16]}}}, "r.yaml"
    )


def test_recipe_order_and_batch_sizes() -> None:
    with pytest.raises(RecipeError, match=r"exports\[0\] \(triton_repository\) serves model.onnx"):
        check_recipe_exports(_recipe([{"format": "triton_repository"}, {"format": "onnx"}]))
    recipe = _recipe([{"format": "onnx", "verify_batch_sizes": [1, 4]}, {"format": "triton_repository"}])
    check_recipe_exports(recipe)
    assert batching(TritonRepositoryConfig(), recipe.evaluation.bench.batch_sizes) == (16, (2, 16))
    assert batching(TritonRepositoryConfig(max_batch_size=4), (1, 2, 4, 16)) == (4, (2, 4))
    with pytest.raises(RecipeError, match=r"exports\[1\].model_name: '../x' is not a usable model name"):
        _recipe([{"format": "onnx"}, {"format": "triton_repository", "model_name": "../x"}])


def test_failed_verification_removes_the_model_folder(tiny_ctx, tmp_path: Path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise ExportError("served model disagrees")

    monkeypatch.setattr(TritonRepositoryExporter, "_verify", fail)
    with pytest.raises(ExportError, match="served model disagrees"):
        _export(tiny_ctx, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the onnx export's file only


def _graph(inputs: list[Any], outputs: list[Any]) -> Any:
    from onnx import helper

    nodes = [helper.make_node("Identity", [i.name], [o.name]) for i, o in zip(inputs, outputs)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


def test_types_dims_and_per_row_scalars_in_the_schema() -> None:
    from onnx import TensorProto, helper

    model = _graph(
        [
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, ["n", 3, "h"]),
            helper.make_tensor_value_info("step", TensorProto.INT32, ["n"]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["n", 3, "h"]),
            helper.make_tensor_value_info("score", TensorProto.INT32, ["n"]),
        ],
    )
    inputs, outputs = onnx_io(model, batched=True)
    text = render_config_pbtxt("m", inputs, outputs, 8, (4, 8), 50, 2, "KIND_GPU")
    pb2 = model_config_pb2()
    cfg = text_format.Parse(text, pb2.ModelConfig())
    pixels, step = cfg.input
    assert pixels.data_type == pb2.TYPE_FP16 and list(pixels.dims) == [3, -1]
    assert step.data_type == pb2.TYPE_INT32 and list(step.dims) == [1] and list(step.reshape.shape) == []
    assert [o.name for o in cfg.output] == ["out", "score"]
    assert cfg.instance_group[0].count == 2
    static = _graph(
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
    )
    with pytest.raises(
        ExportError, match=r"ONNX input 'x' has shape \[4, 3\]: its first axis is not a dynamic"
    ):
        onnx_io(static, batched=True)


def _qdq_export(tiny_ctx, out: Path, target: str, recipe: Any = None, **cfg):
    """onnx + onnx_qdq into ``out``, then the repository, for ``target``."""
    from compressor.exporters.onnx.onnx_qdq import OnnxQdqExportConfig, OnnxQdqExporter

    adapter, model, ctx = tiny_ctx
    qcfg = quantize_config(targets=("encoder.*",), activations="static_per_tensor")
    q = QuantizePass(qcfg).run(model, ctx).model
    sizes = recipe.evaluation.bench.batch_sizes if recipe is not None else ExportContext.batch_sizes
    ectx = ExportContext(
        target=get_target(target), adapter=adapter, data=ctx.data, reference_model=q, batch_sizes=sizes
    )
    OnnxExporter(OnnxExportConfig(verify_batch_sizes=(2,), verify_lengths=(16,))).export(q, ectx, out)
    qdq = OnnxQdqExportConfig(verify_batch_sizes=(2,), verify_lengths=(16,), min_cosine=0.9)
    OnnxQdqExporter(qdq).export(q, ectx, out)
    return TritonRepositoryExporter(TritonRepositoryConfig(**cfg)).export(q, ectx, out)


@pytest.mark.parametrize(
    ("target", "cfg", "served"),
    [
        ("a100", {}, "model.qdq.onnx"),  # a GPU deploys the Q/DQ ONNX
        ("cpu", {}, "model.onnx"),  # the CPU the ONNX Runtime flavour
        ("a100", {"onnx_file": "model.onnx"}, "model.onnx"),  # an explicit choice wins
    ],
)
def test_repository_picks_the_onnx_the_target_deploys(tiny_ctx, tmp_path: Path, target, cfg, served) -> None:
    res = _qdq_export(tiny_ctx, tmp_path, target, **cfg)
    report = res.verification["triton_repository"]
    assert report["serves"] == served
    assert sha256_file(tmp_path / "triton_repository" / "model" / "1" / "model.onnx") == sha256_file(
        tmp_path / served
    )


def test_gpu_recipe_with_only_a_qdq_export_needs_no_onnx_file() -> None:
    recipe = parse_recipe(
        {"target": "a100", "exports": [{"format": "onnx_qdq"}, {"format": "triton_repository"}]}, "r.yaml"
    )
    check_recipe_exports(recipe)  # no `onnx_file: model.qdq.onnx` needed
    cpu = parse_recipe(
        {"target": "cpu", "exports": [{"format": "onnx_qdq"}, {"format": "triton_repository"}]}, "r.yaml"
    )
    check_recipe_exports(cpu)  # ONNX Runtime runs Q/DQ on the CPU too
    with pytest.raises(RecipeError, match=r"serves model.onnx, which no `onnx` export before it writes"):
        check_recipe_exports(
            parse_recipe(
                {
                    "target": "a100",
                    "exports": [
                        {"format": "onnx_qdq"},
                        {"format": "triton_repository", "onnx_file": "model.onnx"},
                    ],
                },
                "r.yaml",
            )
        )


def test_serving_batches_come_from_the_bench_sizes_of_the_recipe(tiny_ctx, tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "target": "a100",
            "exports": [
                {"format": "onnx", "verify_batch_sizes": [1, 3, 5]},
                {"format": "onnx_qdq", "verify_batch_sizes": [1, 3, 7]},
                {"format": "triton_repository"},
            ],
            "evaluation": {"bench": {"batch_sizes": [1, 8, 32]}},
        },
        "r.yaml",
    )
    res = _qdq_export(tiny_ctx, tmp_path, "a100", recipe=recipe)
    cfg = _parse(tmp_path / "triton_repository" / "model" / "config.pbtxt")
    assert cfg.max_batch_size == 32 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
    assert res.verification["triton_repository"]["preferred_batch_sizes"] == [8, 32]
