"""The int8 weight encoding for ONNX Runtime: the U8S8 probe and the exact U8U8 rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.exporters.onnx.ort_int8 import encode_int8_weights_, u8s8_is_exact, uint8_weights_


def _dql_matmulinteger(w: np.ndarray) -> onnx.ModelProto:
    """x (float) -> DynamicQuantizeLinear -> MatMulInteger(w int8) -> int32, as our layers lower."""
    k, n = w.shape
    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "s", "zp"]),
            helper.make_node("MatMulInteger", ["xq", "w", "zp"], ["y"]),
            helper.make_node("Identity", ["xq"], ["xq_out"]),
            helper.make_node("Identity", ["zp"], ["zp_out"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [
            helper.make_tensor_value_info("y", TensorProto.INT32, [None, n]),
            helper.make_tensor_value_info("xq_out", TensorProto.UINT8, [None, k]),
            helper.make_tensor_value_info("zp_out", TensorProto.UINT8, []),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _exact(xq: np.ndarray, zp: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (xq.astype(np.int64) - int(zp)) @ w.astype(np.int64)


def test_uint8_rewrite_is_exact_on_this_cpu() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (96, 40)).astype(np.int8)
    x = rng.standard_normal((33, 96)).astype(np.float32) + 3.0  # mostly positive: large uint8 codes
    model = _dql_matmulinteger(w)
    before = _run(model, x)
    assert uint8_weights_(model) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "w" not in inits and inits["w_u8"].dtype == np.uint8
    np.testing.assert_array_equal(inits["w_u8"].astype(np.int16) - 128, w)
    onnx.checker.check_model(model)
    y, xq, zp = _run(model, x)
    np.testing.assert_array_equal(y, _exact(xq, zp, w))  # U8U8 is exact on every ISA
    # the int8 encoding is exact exactly where the probe says so
    assert np.array_equal(before[0], _exact(before[1], before[2], w)) == u8s8_is_exact()


def test_rewrite_leaves_other_matmulinteger_alone() -> None:
    w = np.ones((4, 3), np.int8)
    model = _dql_matmulinteger(w)
    model.graph.node[1].input[0] = "xq_signed"  # not a DynamicQuantizeLinear output: S8S8 stays
    assert uint8_weights_(model) == 0
    assert [t.name for t in model.graph.initializer] == ["w"]


@pytest.mark.parametrize("choice", ["int8", "uint8", "auto"])
def test_encode_choice(choice: str) -> None:
    model = _dql_matmulinteger(np.ones((8, 2), np.int8))
    info = encode_int8_weights_(model, choice)
    want = {"int8": "int8", "uint8": "uint8", "auto": "int8" if u8s8_is_exact() else "uint8"}[choice]
    assert info["int8_weights"] == want
    assert info["uint8_rewritten"] == (1 if want == "uint8" else 0)
