"""Static per-tensor int8 (the scheme TensorRT runs) and the Q/DQ ONNX exporter."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compressor.errors import ExportError, RecipeError
from compressor.exporters.base import ExportContext
from compressor.exporters.onnx.onnx import OnnxExportConfig, OnnxExporter, ort_session
from compressor.exporters.onnx.onnx_qdq import OnnxQdqExportConfig, OnnxQdqExporter
from compressor.kernels.int8_linear import Int8Linear, static_input_scale
from compressor.passes.quantize.quantize import QuantizePass, activation_absmax, quantize_config
from compressor.recipe import parse_recipe
from compressor.targets import get_target


def _numpy_static_linear(
    x: np.ndarray, q: Int8Linear, s: float, smooth: np.ndarray | None = None
) -> np.ndarray:
    """What an int8 engine computes: int8 codes of x/s, int32-exact products, rescale, bias."""
    if smooth is not None:
        x = x / smooth
    xq = np.clip(np.rint(x / s), -128, 127).astype(np.int64)  # np.rint: round half to even
    wq = q.qweight().numpy().astype(np.int64)
    acc = xq @ wq.T
    bias = q.bias.detach().double().numpy() if q.bias is not None else 0.0
    return acc.astype(np.float64) * s * q.weight_scale.double().numpy() + bias


def test_static_scheme_math_scale_saturation_and_numpy_emulation() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    calib = torch.randn(64, 40) * 2
    amax = calib.abs().amax()
    q = Int8Linear.from_linear(lin, "static_per_tensor", input_scale=static_input_scale(calib.abs().amax(0)))
    assert q.input_scale is not None
    s = float(q.input_scale)
    assert s == pytest.approx(float(amax) / 127, rel=1e-6)  # scale = calibrated amax / 127
    x = torch.randn(3, 7, 40) * 4  # twice the calibrated range: codes must saturate
    codes = torch.round(x / s)
    assert float(codes.abs().max()) > 127  # the case the clamp exists for
    got = q(x).detach().double().numpy()
    want = _numpy_static_linear(x.double().numpy(), q, s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # saturation as QuantizeLinear / TensorRT: a huge input gives exactly the output of
    # x = 127 s, a hugely negative one that of x = -128 s
    for value, code in ((1e4, 127), (-1e4, -128)):
        np.testing.assert_allclose(
            q(torch.full((1, 40), value)).detach().double().numpy(),
            _numpy_static_linear(np.full((1, 40), code * s), q, s),
            rtol=1e-5,
            atol=1e-4,
        )
    # with a SmoothQuant divisor the scale belongs to x / smooth
    smooth = torch.rand(40) + 0.5
    qs = Int8Linear.from_linear(
        lin,
        "static_per_tensor",
        smooth=smooth,
        input_scale=static_input_scale((calib / smooth).abs().amax(0)),
    )
    s2 = float(qs.input_scale)
    np.testing.assert_allclose(
        qs(x).detach().double().numpy(),
        _numpy_static_linear(x.double().numpy(), qs, s2, smooth.double().numpy()),
        rtol=1e-5,
        atol=1e-4,
    )
    # straight-through: the gradient reaches the input and the master weight
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0 and q.weight.grad is not None
    with pytest.raises(ValueError, match="input_scale is required"):
        Int8Linear.from_linear(lin, "static_per_tensor")
    with pytest.raises(ValueError, match="input_scale is not used"):
        Int8Linear.from_linear(lin, "dynamic_per_token", input_scale=1.0)


def _static(tiny_ctx, target: str = "a100", **cfg):
    adapter, model, ctx = tiny_ctx
    ctx.target = get_target(target)
    opts = {"targets": ("encoder.*",), "activations": "static_per_tensor", **cfg}
    out = QuantizePass(quantize_config(**opts)).run(model, ctx)
    return adapter, out.model, ctx, out


def test_quantize_pass_calibrates_static_scales(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    float_model = copy.deepcopy(model)
    _, q, ctx, out = _static(tiny_ctx, smoothquant=True, alpha=0.5)
    assert out.details["activation_scheme"] == "static_per_tensor"
    QuantizePass(quantize_config()).ensures(out, ctx)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    assert len(layers) == 12
    # every scale is the calibrated max |x / smooth| / 127 of the float model's input
    cal = ctx.data.calibration[:4]
    stats = activation_absmax(float_model, list(layers), adapter.forward, cal)
    for n, m in layers.items():
        assert m.act_scheme == "static_per_tensor" and m.input_scale is not None
        amax = stats[n] if m.smooth is None else stats[n] / m.smooth
        assert float(m.input_scale) == pytest.approx(float(amax.max()) / 127, rel=1e-5), n
    # and the model still computes the same embeddings
    with torch.no_grad():
        a = torch.cat([adapter.forward(q, b) for b in ctx.data.eval])
        b = torch.cat([adapter.forward(ctx.teacher, b) for b in ctx.data.eval])
    mean_cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    assert mean_cos > 0.995, mean_cos


def _export(adapter, q, ctx, tmp_path: Path, **cfg):
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    return ectx, OnnxQdqExporter(OnnxQdqExportConfig(**cfg)).export(q, ectx, tmp_path)


def _qdq_linears(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """(the MatMul, its int8 weight [N, K]) for every MatMul fed by the Q/DQ pattern; asserts the pattern."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for mm in (n for n in model.graph.node if n.op_type == "MatMul"):
        b = producer.get(mm.input[1])
        if b is None or b.op_type != "Transpose":
            continue
        wdq = producer.get(b.input[0])
        if wdq is None or wdq.op_type != "DequantizeLinear":
            continue
        w = inits[wdq.input[0]]
        assert w.data_type == onnx.TensorProto.INT8
        assert {a.name: a.i for a in wdq.attribute}.get("axis") == 0  # per output channel of [N, K]
        assert len(numpy_helper.to_array(inits[wdq.input[1]])) == w.dims[0]
        xdq = producer[mm.input[0]]
        assert xdq.op_type == "DequantizeLinear"
        xq = producer[xdq.input[0]]
        assert xq.op_type == "QuantizeLinear" and xq.input[1] == xdq.input[1]  # same static scale
        zp_name = xq.input[2]
        zp = (
            numpy_helper.to_array(inits[zp_name])
            if zp_name in inits
            else numpy_helper.to_array(producer[zp_name].attribute[0].t)
        )
        assert zp.dtype == np.int8 and int(zp) == 0  # symmetric int8
        assert xq.input[1] in inits and numpy_helper.to_array(inits[xq.input[1]]).shape == ()
        found.append((mm, numpy_helper.to_array(w)))
    return found


def test_qdq_placement_and_ort_agrees_with_torch(tiny_ctx, tmp_path: Path) -> None:
    adapter, q, ctx, _ = _static(tiny_ctx, smoothquant=True, alpha=0.5)
    ectx, res = _export(adapter, q, ctx, tmp_path)
    assert res.artifacts == {"onnx_qdq": "model.qdq.onnx"}
    report = res.verification["onnx_qdq"]
    assert report["cases"] == 9 and report["min_cosine"] >= 0.999 and report["qdq_layers"] == 12
    model = onnx.load(str(tmp_path / "model.qdq.onnx"))
    onnx.checker.check_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # no ORT contrib ops for TensorRT
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)
    pattern = _qdq_linears(model)
    assert len(pattern) == 12  # every quantized layer, and each one through Q/DQ
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 12
    weights = [w for _, w in pattern]
    for name, m in q.named_modules():
        if isinstance(m, Int8Linear):  # OUR int8 codes travel, in [N, K]
            assert any(np.array_equal(w, m.qweight().numpy()) for w in weights), name
    # SmoothQuant's divisor is a Mul right before the activation's QuantizeLinear
    producer = {o: n for n in model.graph.node for o in n.output}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(producer[n.input[0]].op_type == "Mul" for n in qs)
    # ONNX Runtime on a fresh shape agrees with torch
    sess = ort_session(tmp_path / "model.qdq.onnx")
    batch = adapter.verification_cases(ctx.data.eval[0], (5,), (20,))[0]
    out = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        ref = adapter.forward(q, batch).numpy()
    cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert float(cos.min()) >= 0.999


def test_fp16_float_parts_for_strongly_typed_builds(tiny_ctx, tmp_path: Path) -> None:
    """float_dtype: fp16: every float tensor of the graph is fp16 (Q/DQ scales included, so the
    int8 GEMMs feed fp16), the output stays fp32, and ONNX Runtime still agrees with torch."""
    adapter, q, ctx, _ = _static(tiny_ctx, smoothquant=True, alpha=0.5)
    _, res = _export(adapter, q, ctx, tmp_path, float_dtype="fp16", opset=19)
    report = res.verification["onnx_qdq"]
    assert report["min_cosine"] >= 0.999 and report["fp16"]["initializers"] > 0, report
    # BERT's attention-mask bias (finfo(float32).min) had to saturate to -65504, not -inf
    assert report["fp16"]["saturated"] >= 1
    model = onnx.load(str(tmp_path / "model.qdq.onnx"))
    onnx.checker.check_model(model)
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert floats == []
    assert not any(
        a.t.data_type == onnx.TensorProto.FLOAT
        for n in model.graph.node
        for a in n.attribute
        if a.type == a.TENSOR
    )
    assert not any(  # no cast back to fp32 except the output's
        a.i == onnx.TensorProto.FLOAT for n in model.graph.node if n.op_type == "Cast" and n.output[0] not in
        {o.name for o in model.graph.output} for a in n.attribute
    )  # fmt: skip
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    inits = {t.name: t for t in model.graph.initializer}
    pattern = _qdq_linears(model)
    assert len(pattern) == 12
    producer = {o: n for n in model.graph.node for o in n.output}
    for mm, _ in pattern:
        scale = inits[producer[mm.input[0]].input[1]]
        assert scale.data_type == onnx.TensorProto.FLOAT16
    with pytest.raises(RecipeError, match=r"float_dtype: fp16 needs opset: 19 or later"):
        parse_recipe({"target": "a100", "exports": [{"format": "onnx_qdq", "float_dtype": "fp16"}]})


def test_dynamic_scheme_and_fp8_are_refused(tiny_ctx, tmp_path: Path) -> None:
    adapter, model, ctx = tiny_ctx
    ctx.target = get_target("a100")
    dyn = QuantizePass(quantize_config(targets=("encoder.*",))).run(copy.deepcopy(model), ctx).model
    with pytest.raises(ExportError, match=r"dynamic_per_token.*set `activations: static_per_tensor`"):
        _export(adapter, dyn, ctx, tmp_path)
    ctx.target = get_target("h100")
    fp8 = (
        QuantizePass(quantize_config(method="fp8", targets=("encoder.*",)))
        .run(copy.deepcopy(model), ctx)
        .model
    )
    with pytest.raises(ExportError, match="FP8 Q/DQ is not exported"):
        _export(adapter, fp8, ctx, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_24_pattern_survives_in_the_int8_initializers(tiny_ctx, tmp_path: Path) -> None:
    from compressor.passes.sparsity.sparsify import SparsifyConfig, SparsifyPass

    adapter, model, ctx = tiny_ctx
    ctx.target = get_target("a100")
    sparse = SparsifyPass(SparsifyConfig(targets=("encoder.*",))).run(model, ctx).model
    q = (
        QuantizePass(quantize_config(targets=("encoder.*",), activations="static_per_tensor"))
        .run(sparse, ctx)
        .model
    )
    _, res = _export(adapter, q, ctx, tmp_path)
    assert res.verification["onnx_qdq"]["min_cosine"] >= 0.999
    pattern = _qdq_linears(onnx.load(str(tmp_path / "model.qdq.onnx")))
    assert len(pattern) == 12
    for _, w in pattern:  # [N, K]: at least 2 zeros in every group of 4 along K
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()
        assert (w != 0).mean() > 0.4  # still a real weight, not wiped out


def test_disagreement_fails_the_export_and_leaves_no_file(tiny_ctx, tmp_path: Path, monkeypatch) -> None:
    import compressor.exporters.onnx.onnx_qdq as qdq

    adapter, q, ctx, _ = _static(tiny_ctx)
    real = qdq.verify_onnx

    def against_a_different_model(path, model, c, sizes, lengths):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Int8Linear):
                    m.weight.mul_(-1.0)
        return real(path, model, c, sizes, lengths)

    monkeypatch.setattr(qdq, "verify_onnx", against_a_different_model)
    with pytest.raises(ExportError, match="ONNX Runtime disagrees with torch on the Q/DQ model"):
        _export(adapter, q, ctx, tmp_path)
    assert not (tmp_path / "model.qdq.onnx").exists()


def test_static_scheme_in_the_onnx_runtime_flavour(tiny_ctx, tmp_path: Path) -> None:
    """The ORT flavour lowers static layers to int8 codes with the calibrated scale (S8S8 MatMulInteger)."""
    adapter, q, ctx, _ = _static(tiny_ctx, target="cpu", smoothquant=True, alpha=0.5)
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    res = OnnxExporter(OnnxExportConfig()).export(q, ectx, tmp_path)
    assert res.verification["onnx"]["min_cosine"] >= 0.999
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat") == 12
    assert "DynamicQuantizeLinear" not in ops


def test_fp16_rewrite_keeps_float_inputs_and_outputs_fp32() -> None:
    from onnx import TensorProto, helper

    from compressor.exporters.onnx.fp16 import float_to_fp16_

    w = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    b = np.array([1e6, -1e9, 0.5], np.float32)  # two values past fp16's range
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    counts = float_to_fp16_(model)
    onnx.checker.check_model(model)
    assert counts == {"initializers": 2, "constants": 0, "casts": 0, "saturated": 2}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    import onnxruntime as ort

    x = np.random.default_rng(1).random((2, 4)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert got.dtype == np.float32
    expect = x.astype(np.float16) @ w.astype(np.float16) + np.clip(b, -65504, 65504).astype(np.float16)
    np.testing.assert_allclose(got, expect.astype(np.float32), rtol=2e-3, atol=1e-2)
