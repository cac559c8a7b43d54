"""Int8 weight encoding for ONNX Runtime's ``MatMulInteger`` on the CPU it runs on.

Our int8 layers lower to ``MatMulInteger`` with uint8 activations (``DynamicQuantizeLinear``,
or ``q + 128`` for the symmetric schemes) times int8 weights (U8S8). On x86 CPUs without
VNNI (AVX2 only, e.g. many AMD EPYC hosts), ONNX Runtime's MLAS runs U8S8 with
``vpmaddubsw``, which adds pairs of ``u8 × s8`` products into *saturating* int16:
``255 · 127 · 2`` overflows, and the engine silently returns wrong sums (seen here: max error 136,265 on a 4096×384×1536
GEMM, min cosine 0.978 on a tiny BERT). With VNNI (``vpdpbusd``) U8S8 is exact.

U8U8 (weights stored as ``w + 128`` with zero point 128) goes through 16-bit
multiply-adds and is exact on every ISA (seen here: exact, and about 12% slower than
the saturating U8S8 kernel on AVX2). S8S8 is exact on AVX2 too but about 3.8x slower
than U8U8 (measured 228 vs 60 ms on 4096×384×1536), so our static and per-token layers
also feed uint8 codes (``q + 128``, zero point 128) and go through the same choice.

So the exporter *measures* instead of assuming: :func:`u8s8_is_exact` runs a small
saturation-prone ``MatMulInteger`` in this ONNX Runtime, and ``int8_weights: auto``
keeps int8 weights where U8S8 is exact and rewrites them to uint8 where it is not.
A bundle exported with int8 weights on a VNNI machine would saturate on an AVX2-only
one: export with ``int8_weights: uint8`` for a bundle that is exact on any x86 CPU.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Int8Weights = Literal["auto", "int8", "uint8"]
INT8_WEIGHT_CHOICES: tuple[str, ...] = ("auto", "int8", "uint8")


@functools.lru_cache(maxsize=1)
def u8s8_is_exact() -> bool:
    """Whether this ONNX Runtime computes uint8 × int8 ``MatMulInteger`` without saturation."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 16, 64, 16
    a = np.full((m, k), 255, np.uint8)  # worst case for int16 pair sums: 255·127 + 255·127
    w = np.full((k, n), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"a": a})[0]
    exact = bool((got.astype(np.int64) == a.astype(np.int64) @ w.astype(np.int64)).all())
    log.info("ONNX Runtime U8S8 MatMulInteger on this CPU is %s", "exact" if exact else "saturating")
    return exact


def resolve_int8_weights(choice: str) -> Literal["int8", "uint8"]:
    """``auto`` → ``int8`` where U8S8 is exact on this machine, else ``uint8``."""
    if choice == "int8":
        return "int8"
    if choice == "uint8":
        return "uint8"
    return "int8" if u8s8_is_exact() else "uint8"


def uint8_weights_(model: Any) -> int:
    """Rewrite U8S8 ``MatMulInteger`` nodes to U8U8 in place; returns how many changed.

    A node qualifies when its activation input is uint8 (from ``DynamicQuantizeLinear``,
    a uint8 ``QuantizeLinear`` or a ``Cast`` to uint8) and its weight is an int8
    initializer without a zero point. The weight becomes ``w + 128`` (uint8) with a scalar
    zero point of 128: ``(w + 128) - 128 = w``, so the integer result is unchanged.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    uint8_outputs = _uint8_activations(model)
    converted: dict[str, str] = {}
    zp_name = "int8_weights_uint8_zero_point"
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulInteger" or node.input[0] not in uint8_outputs:
            continue
        w_name = node.input[1]
        init = inits.get(w_name)
        has_w_zp = len(node.input) > 3 and node.input[3] != ""
        if init is None or has_w_zp or init.data_type != 3:  # 3 = INT8
            continue
        if w_name not in converted:
            w = numpy_helper.to_array(init).astype(np.int16) + 128
            new = numpy_helper.from_array(w.astype(np.uint8), w_name + "_u8")
            model.graph.initializer.append(new)
            converted[w_name] = new.name
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[1], inputs[3] = converted[w_name], zp_name
        del node.input[:]
        node.input.extend(inputs)
        changed += 1
    if changed:
        model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp_name))
        still_used = {i for n in model.graph.node for i in n.input}
        kept = [t for t in model.graph.initializer if t.name in still_used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return changed


def _uint8_activations(model: Any) -> set[str]:
    """Names of the tensors that nodes of ``model`` produce as uint8 quantized activations."""
    from onnx import TensorProto

    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            dtypes[n.output[0]] = n.attribute[0].t.data_type
    out: set[str] = set()
    for n in model.graph.node:
        if n.op_type == "DynamicQuantizeLinear":
            out.add(n.output[0])
        elif n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.UINT8 for a in n.attribute):
            out.add(n.output[0])
        elif (
            n.op_type == "QuantizeLinear" and len(n.input) > 2 and dtypes.get(n.input[2]) == TensorProto.UINT8
        ):
            out.add(n.output[0])
    return out


def encode_int8_weights_(model: Any, choice: str) -> dict[str, Any]:
    """Apply ``choice`` (auto / int8 / uint8) to ``model``; returns what was decided, for the report."""
    resolved = resolve_int8_weights(choice)
    changed = uint8_weights_(model) if resolved == "uint8" else 0
    return {"int8_weights": resolved, "u8s8_exact_here": u8s8_is_exact(), "uint8_rewritten": changed}
