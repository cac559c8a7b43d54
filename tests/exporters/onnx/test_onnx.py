from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.errors import ExportError
from compressor.exporters.base import ExportContext
from compressor.exporters.onnx.onnx import OnnxExportConfig, OnnxExporter, ort_session
from compressor.exporters.onnx.ort_int8 import u8s8_is_exact
from compressor.kernels.int8_linear import Int8Linear
from compressor.passes.quantize.quantize import QuantizePass, quantize_config


def _export(tiny_ctx, tmp_path: Path, **cfg):
    adapter, model, ctx = tiny_ctx
    q = (
        QuantizePass(quantize_config(targets=("encoder.*",), smoothquant=True, alpha=0.5))
        .run(model, ctx)
        .model
    )
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    res = OnnxExporter(OnnxExportConfig(**cfg)).export(q, ectx, tmp_path)
    return q, ectx, res


def test_int8_round_trip_through_onnx_runtime(tiny_ctx, tmp_path: Path) -> None:
    q, ectx, res = _export(tiny_ctx, tmp_path)
    assert res.artifacts == {"onnx": "model.onnx"}
    report = res.verification["onnx"]
    assert report["cases"] == 9 and report["min_cosine"] > 0.999
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger", "MultiHeadAttention"} <= ops
    assert "Where" not in ops and "IsNaN" not in ops  # none of the SDPA masking subgraph
    # The contract other tools read: names, dtypes, dynamic batch and length.
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for i in inputs.values():
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = i.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    # OUR int8 weights travel, not a re-quantization: every Int8Linear's weight is an initializer,
    # as int8 or (where this CPU's ONNX Runtime saturates U8S8) as uint8 w + 128.
    uint8 = report["int8_weights"] == "uint8"
    assert uint8 == (not u8s8_is_exact())
    dtype = onnx.TensorProto.UINT8 if uint8 else onnx.TensorProto.INT8
    inits = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == dtype]
    for name, m in q.named_modules():
        if isinstance(m, Int8Linear):
            w = m.qweight().t().numpy().astype(np.int16) + (128 if uint8 else 0)
            assert any(i.shape == w.shape and np.array_equal(i.astype(np.int16), w) for i in inits), name


def test_output_is_the_normalised_sentence_embedding(tiny_ctx, tmp_path: Path) -> None:
    q, ectx, _ = _export(tiny_ctx, tmp_path)
    sess = ort_session(tmp_path / "model.onnx")
    batch = ectx.adapter.verification_cases(ectx.data.eval[0], (5,), (20,))[0]
    out = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    with torch.no_grad():
        ref = ectx.adapter.forward(q, batch).numpy()
    assert float((out * ref).sum(-1).min()) > 0.999


def test_disagreement_fails_the_export(tiny_ctx, tmp_path: Path, monkeypatch) -> None:
    # Make the torch reference disagree with what gets exported: the export must refuse.
    import compressor.exporters.onnx.onnx as onnx_exporter

    real_verify = onnx_exporter.verify_onnx

    def verify_against_a_different_model(path, model, ctx, sizes, lengths):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Int8Linear):
                    m.weight.mul_(-1.0)
        return real_verify(path, model, ctx, sizes, lengths)

    monkeypatch.setattr(onnx_exporter, "verify_onnx", verify_against_a_different_model)
    with pytest.raises(ExportError, match="ONNX Runtime disagrees with torch: min cosine"):
        _export(tiny_ctx, tmp_path)


def test_fp32_graph_matches_transformers(tiny_ctx, tmp_path: Path) -> None:
    """The layer-by-layer export graph computes what transformers computes (no passes at all)."""
    adapter, model, ctx = tiny_ctx
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=model)
    res = OnnxExporter(OnnxExportConfig(min_cosine=0.99999)).export(model, ectx, tmp_path)
    assert res.verification["onnx"]["max_abs_error"] < 1e-4


def test_portable_uint8_weights_are_exact_and_bad_choices_refused(tiny_ctx, tmp_path: Path) -> None:
    # int8_weights: uint8 gives a bundle exact on any x86 CPU (VNNI or not), whatever this one is
    _, _, res = _export(tiny_ctx, tmp_path, int8_weights="uint8")
    report = res.verification["onnx"]
    assert report["int8_weights"] == "uint8" and report["uint8_rewritten"] > 0
    assert report["min_cosine"] > 0.999
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert not any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    from compressor.errors import RecipeError

    with pytest.raises(
        RecipeError, match=r"exports\[0\]\.int8_weights: 's8' is not one of auto, int8, uint8"
    ):
        OnnxExportConfig(int8_weights="s8").validate("exports[0]")


def test_per_token_int8_stays_exact_under_ort_graph_fusions(tiny_ctx, tmp_path: Path) -> None:
    """Per-token row scales must never reach MatMulIntegerToFloat's a_scale (one number per
    tensor): seen on MiniLM as min cosine 0.61 at ORT's default optimization level. Our own
    fusion (compressor.exporters.onnx.ort_fusions) gives it a_scale 1 and the column scale."""
    import onnxruntime as ort

    from compressor.targets import get_target
    from tests.conftest import add_activation_outliers_

    adapter, model, ctx = tiny_ctx
    add_activation_outliers_(model)
    ctx.target = get_target("a100")
    q = (
        QuantizePass(quantize_config(targets=("encoder.*",), activations="dynamic_per_token"))
        .run(model, ctx)
        .model
    )
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    res = OnnxExporter(OnnxExportConfig(int8_weights="uint8")).export(q, ectx, tmp_path)
    assert res.verification["onnx"]["min_cosine"] > 0.999
    path = str(tmp_path / "model.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    scalars = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer if not t.dims}
    fused = [n for n in optimized.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 12  # every int8 layer
    assert all(n.input[2] in scalars and float(scalars[n.input[2]]) == 1.0 for n in fused)
    batch = ectx.adapter.verification_cases(ectx.data.eval[0], (3,), (20,))[0]
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {k: v.numpy() for k, v in batch.items()})[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("scheme", ["static_per_tensor", "dynamic_per_token"])
def test_symmetric_schemes_feed_uint8_codes_and_match_torch(tiny_ctx, tmp_path: Path, scheme: str) -> None:
    """Static and per-token layers run ONNX Runtime's U8U8 / U8S8 kernels (uint8 codes q + 128,
    zero point 128), not its S8S8 one (several times slower on AVX2), and stay exact vs torch."""
    adapter, model, ctx = tiny_ctx
    q = (
        QuantizePass(quantize_config(targets=("encoder.*",), smoothquant=True, activations=scheme))
        .run(model, ctx)
        .model
    )
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    res = OnnxExporter(OnnxExportConfig(int8_weights="uint8")).export(q, ectx, tmp_path)
    report = res.verification["onnx"]
    assert report["min_cosine"] > 0.999
    n_int8 = sum(isinstance(m, Int8Linear) for m in q.modules())
    assert report["uint8_rewritten"] == n_int8  # every layer's activations were recognised as uint8
    model_proto = onnx.load(str(tmp_path / "model.onnx"))
    ops = [n.op_type for n in model_proto.graph.node]
    assert ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat") == n_int8
    if scheme == "static_per_tensor":
        assert ops.count("QuantizeLinear") == n_int8 and "Round" not in ops
    else:
        assert "DynamicQuantizeLinear" not in ops
