"""Int4Linear: packed int4 layer vs the dequantized nn.Linear, on the reference path and
on the Triton kernel path (interpreted on CPU), plus bytes, repr, state dict and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.kernels import int4_linear
from compressor.kernels.int4_linear import Int4Linear
from compressor.passes.int4 import quantize_rtn


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
    real = int4_linear.w4a16_linear

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(int4_linear, "w4a16_linear", spy)
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
