"""Int4Linear: packed int4 layer vs the dequantized nn.Linear, on the reference path and
on the Triton kernel path (interpreted on CPU), plus bytes, repr, state dict and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels import int4_linear, w4a16
from compressor.kernels.int4_format import quantize_rtn
from compressor.kernels.int4_linear import Int4Linear


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(k: int = 192, n: int = 80, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_from_linear_matches_dequantized_linear(use_kernel: bool) -> None:
    lin = _linear()
    layer = Int4Linear.from_linear(lin, group_size=32, use_kernel=use_kernel)
    qw = quantize_rtn(lin.weight.detach(), bits=4, group_size=32, symmetric=True)
    x = torch.randn(2, 3, 192)  # [..., K]
    with torch.no_grad():
        expected = F.linear(x, qw.dequantize(), lin.bias)
        y = layer(x)
        assert tuple(y.shape) == (2, 3, 80)
        assert _rel_err(y, expected) < 1e-5
        # The layer is a 4-bit approximation of the float layer, not something else.
        w_err = _rel_err(layer.dequantized_weight(), lin.weight)
        assert 0.01 < w_err < 0.15
        y16 = layer(x.half())
        assert y16.dtype == torch.float16
        assert _rel_err(y16, expected) < 3e-3


def test_kernel_path_is_taken_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = w4a16.w4a16_linear

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(w4a16, "w4a16_linear", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = Int4Linear.from_linear(_linear(64, 48), group_size=64)
    x = torch.randn(5, 64)
    ref = layer(x)
    assert calls == []
    layer.use_kernel = True
    out = layer(x)
    assert calls == [(5, 64)]
    assert _rel_err(out, ref) < 1e-5
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter, no GPU: the reference
    layer(x)
    assert calls == [(5, 64)]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(int4_linear, "HAS_TRITON", False)  # asked, but Triton is not installed
    assert torch.equal(layer(x), ref)
    assert calls == [(5, 64)]


def test_from_quantized_asymmetric_without_bias() -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    qw = quantize_rtn(w, bits=4, group_size=64, symmetric=False)
    layer = Int4Linear.from_quantized(qw, use_kernel=True)
    assert layer.bias is None
    assert torch.equal(layer.dequantized_weight(), qw.dequantize())
    x = torch.randn(33, 128)
    assert _rel_err(layer(x), x @ qw.dequantize().t()) < 1e-5


def test_per_channel_group() -> None:
    lin = _linear(64, 48)
    layer = Int4Linear.from_linear(lin, group_size=None)
    assert layer.group_size == 64 and tuple(layer.scales.shape) == (1, 48)
    qw = quantize_rtn(lin.weight.detach(), bits=4, group_size=None)
    assert torch.equal(layer.dequantized_weight(), qw.dequantize())


def test_weight_bytes_repr_and_state_dict() -> None:
    lin = _linear(192, 80)
    layer = Int4Linear.from_linear(lin, group_size=32)
    # codes 4 bits each; a float32 scale and a uint8 zero per group of 32; float32 bias
    assert layer.weight_bytes() == 192 * 80 // 2 + 6 * 80 * 4 + 6 * 80 + 80 * 4
    assert layer.weight_bytes() < 0.2 * 4 * lin.weight.numel()
    text = repr(layer)
    assert "in_features=192" in text and "out_features=80" in text and "group_size=32" in text
    fresh = Int4Linear(192, 80, group_size=32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 192)
    assert torch.equal(fresh(x), layer(x))


def test_errors_name_the_problem() -> None:
    lin = _linear(64, 48)
    with pytest.raises(ValueError, match="method 'gptq' is not one of rtn"):
        Int4Linear.from_linear(lin, method="gptq")
    with pytest.raises(ValueError, match="group_size=48 must be positive and divide in_features=64"):
        Int4Linear(64, 48, group_size=48)
    with pytest.raises(ValueError, match="in_features=60 must be a multiple of 8"):
        Int4Linear(60, 48, group_size=60)
    layer = Int4Linear.from_linear(lin, group_size=32)
    with pytest.raises(ValueError, match="input has 32 features, Int4Linear expects 64"):
        layer(torch.randn(2, 32))
    with pytest.raises(ValueError, match="bias shape"):
        Int4Linear.from_quantized(quantize_rtn(lin.weight.detach(), 4, 32), bias=torch.zeros(3))


@pytest.mark.parametrize(("group", "symmetric", "k"), [(32, True, 96), (64, False, 192)])
def test_onnx_lowers_to_matmulnbits_and_runs_exactly_in_onnx_runtime(
    group: int, symmetric: bool, k: int, tmp_path: Path
) -> None:
    import warnings

    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(
        Int4Linear.from_linear(nn.Linear(k, 40), group, symmetric=symmetric), nn.GELU()
    ).eval()
    x = torch.randn(3, 5, k)
    with torch.no_grad():
        ref = model(x).numpy()
    model[0].freeze_for_export_()
    path = tmp_path / "int4.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "b", 1: "t"}}, opset_version=17, dynamo=False,
        )  # fmt: skip
    graph = onnx.load(str(path)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and {a.name: a.i for a in nbits[0].attribute}["block_size"] == group
    # OUR codes travel: the packed B initializer holds exactly the layer's 4-bit codes
    b = next(onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name == nbits[0].input[1])
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(40, k)
    from compressor.kernels.int4_format import unpack_w4a16

    assert np.array_equal(codes, unpack_w4a16(model[0].packed).t().numpy())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((3, 5, k), (1, 11, k)):
        xi = torch.randn(*shape)
        with torch.no_grad():
            expect = model(xi).numpy()
        np.testing.assert_allclose(sess.run(None, {"x": xi.numpy()})[0], expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)


def test_onnx_needs_a_power_of_two_group() -> None:
    layer = Int4Linear.from_linear(nn.Linear(48, 8), group_size=24)
    with pytest.raises(ValueError, match="power-of-two group of at least 16, got 24"):
        layer.freeze_for_export_()
