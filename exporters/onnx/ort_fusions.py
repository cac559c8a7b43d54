"""Graph rewrites that let ONNX Runtime's CPU kernels do in one pass what our lowering spells out.

``fuse_column_scales_``: a ``MatMulInteger → Cast(float) → Mul(w_scale)`` chain whose scale is
a per-column initializer becomes one ``com.microsoft.MatMulIntegerToFloat`` with ``a_scale = 1``
and ``b_scale = w_scale``: MLAS applies the column scale while it writes the int32 result, so
the int32 tensor is never cast and scaled as two more passes over the output. The per-token
layers need it: their per-row scale cannot go into the fused kernel (its ``a_scale`` is one
number), so they keep one ``Mul`` by the row scale after it. The per-tensor layers do not match
(their scale is a product computed in the graph), and ONNX Runtime fuses those itself
(``DynamicQuantizeMatMul``). The results are bit-identical (the same integer GEMM, the same
float products); measured on MiniLM per-token int8, 32 x 128, 2 threads, AVX2: 1358 vs 1422 ms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ONE = "column_scale_fusion_one"


def fuse_column_scales_(model: Any) -> int:
    """Rewrite the chains in place; returns how many were fused."""
    from onnx import helper, numpy_helper

    graph = model.graph
    column_scales = {t.name for t in graph.initializer if len(t.dims) == 1}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    fused: dict[int, Any] = {}
    dropped: set[int] = set()
    for n in graph.node:
        if n.op_type != "MatMulInteger" or n.output[0] in graph_outputs:
            continue
        casts = consumers.get(n.output[0], [])
        if len(casts) != 1 or casts[0].op_type != "Cast" or casts[0].output[0] in graph_outputs:
            continue
        cast = casts[0]
        if [a.i for a in cast.attribute if a.name == "to"] != [1]:  # 1 = FLOAT
            continue
        users = consumers.get(cast.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul":
            continue
        mul = users[0]
        scale = [i for i in mul.input if i != cast.output[0]]
        if len(scale) != 1 or scale[0] not in column_scales:
            continue
        zps = list(n.input[2:4]) + [""] * (4 - len(n.input))
        inputs = [n.input[0], n.input[1], _ONE, scale[0], zps[0], zps[1]]
        while inputs[-1] == "":
            inputs.pop()
        fused[id(n)] = helper.make_node(
            "MatMulIntegerToFloat",
            inputs,
            [mul.output[0]],
            name=f"{n.name or 'mmi'}_to_float",
            domain="com.microsoft",
        )
        dropped.update((id(cast), id(mul)))
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), _ONE))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)
