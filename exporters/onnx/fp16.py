"""The float parts of an ONNX graph in fp16, for strongly typed TensorRT builds.

A ``--stronglyTyped`` TensorRT build runs every tensor in the type the ONNX gives it: an
fp32 graph around int8 Q/DQ GEMMs runs attention, LayerNorm, GELU and the residual adds
in fp32. :func:`float_to_fp16_` rewrites a traced graph so that everything float is
fp16, with two exceptions that keep it exact where fp16 cannot represent a value:

- every float initializer and ``Constant`` becomes fp16, saturated to +-65504 (the
  attention-mask bias ``finfo(float32).min`` would become ``-inf`` and ``0 * -inf`` NaN);
- ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)`` and ``ConstantOfShape`` fills fp16;
- the graph's float inputs and outputs stay fp32, through a ``Cast`` after / before them
  (what a serving stack feeds and reads).

Q/DQ scales become fp16 too, so ``DequantizeLinear`` outputs fp16 and the int8 GEMMs feed
fp16 (ONNX opset 19 lets ``QuantizeLinear`` / ``DequantizeLinear`` take fp16 scales; 13-18
only fp32, so fp16 needs opset 19 or later).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FP16_MAX = 65504.0


def _fp16_tensor(t: Any) -> tuple[Any, int]:
    """``t`` as fp16, saturated to the fp16 range; and how many values had to saturate."""
    from onnx import numpy_helper

    arr = np.asarray(numpy_helper.to_array(t))
    saturated = int((np.abs(arr) > FP16_MAX).sum())
    return numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), t.name), saturated


def float_to_fp16_(model: Any) -> dict[str, int]:
    """Rewrite ``model`` (an onnx ModelProto) in place; returns what was converted."""
    from onnx import TensorProto, helper, shape_inference

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    graph = model.graph
    counts = {"initializers": 0, "constants": 0, "casts": 0, "saturated": 0}
    for i, t in enumerate(graph.initializer):
        if t.data_type == FLOAT:
            new, saturated = _fp16_tensor(t)
            graph.initializer[i].CopyFrom(new)
            counts["initializers"] += 1
            counts["saturated"] += saturated
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.TENSOR and attr.t.data_type == FLOAT:
                new, saturated = _fp16_tensor(attr.t)
                attr.t.CopyFrom(new)
                counts["constants"] += 1
                counts["saturated"] += saturated
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
                counts["casts"] += 1
    # float inputs and outputs stay fp32: a Cast after each input, before each output
    boundary = [(i.name, HALF) for i in graph.input if i.type.tensor_type.elem_type == FLOAT]
    boundary += [(o.name, FLOAT) for o in graph.output if o.type.tensor_type.elem_type == FLOAT]
    for name, to in boundary:
        inner = f"{name}__fp16"
        for node in graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
            if to == FLOAT:  # an output: its producer now writes the fp16 tensor
                node.output[:] = [inner if o == name else o for o in node.output]
        src, dst = (name, inner) if to == HALF else (inner, name)
        cast = helper.make_node("Cast", [src], [dst], to=to, name=f"{name}_cast")
        if to == HALF:
            graph.node.insert(0, cast)
        else:
            graph.node.append(cast)
    del graph.value_info[:]
    model.CopyFrom(shape_inference.infer_shapes(model))
    return counts
