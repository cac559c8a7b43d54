"""Per-token int8 in ONNX Runtime: a sentence's embedding does not depend on its batch-mates."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx

from compressor.exporters.base import ExportContext
from compressor.exporters.onnx.onnx import OnnxExportConfig, OnnxExporter, ort_session
from compressor.modules import batch_invariance
from compressor.passes.quantize.quantize import QuantizePass, quantize_config
from tests.conftest import add_activation_outliers_

SHORT = "Return the number of items in the queue."
LONG = " ".join(["The file is opened for reading and writing, and the buffer is flushed on close."] * 6)


def _bundle(tiny_ctx, tmp_path: Path, activations: str):
    adapter, model, ctx = tiny_ctx
    model = copy.deepcopy(model)
    add_activation_outliers_(model)
    cfg = quantize_config(targets=("encoder.*",), activations=activations)
    q = QuantizePass(cfg).run(model, ctx).model
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    out = tmp_path / activations
    out.mkdir()
    OnnxExporter(OnnxExportConfig()).export(q, ectx, out)
    return adapter, q, ort_session(out / "model.onnx"), onnx.load(str(out / "model.onnx"))


def _alone_and_batched(adapter, sess) -> tuple[np.ndarray, np.ndarray, int]:
    alone = adapter.tokenize([SHORT], 128)
    batched = adapter.tokenize([SHORT, LONG], 128)  # SHORT padded to LONG's length
    names = {i.name for i in sess.get_inputs()}
    a = sess.run(None, {k: v.numpy() for k, v in alone.items() if k in names})[0][0]
    b = sess.run(None, {k: v.numpy() for k, v in batched.items() if k in names})[0][0]
    return a, b, int(batched["input_ids"].shape[1])


def test_per_token_int8_is_batch_invariant_in_onnx_runtime(tiny_ctx, tmp_path: Path) -> None:
    adapter, q, sess, proto = _bundle(tiny_ctx, tmp_path, "dynamic_per_token")
    ops = {n.op_type for n in proto.graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"QuantizeLinear", "MatMulIntegerToFloat"} <= ops
    a, b, padded = _alone_and_batched(adapter, sess)
    assert padded > 3 * len(adapter.tokenize([SHORT], 128)["input_ids"][0])
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert batch_invariance(q) == {"batch_invariant": True}


def test_per_tensor_int8_is_not_and_says_so(tiny_ctx, tmp_path: Path) -> None:
    adapter, q, sess, _ = _bundle(tiny_ctx, tmp_path, "dynamic_per_tensor")
    a, b, _ = _alone_and_batched(adapter, sess)
    assert np.abs(a - b).max() > 1e-4  # the long batch-mate moved the shared activation scale
    report = batch_invariance(q)
    assert report["batch_invariant"] is False and "per tensor" in str(report["why_not"])
