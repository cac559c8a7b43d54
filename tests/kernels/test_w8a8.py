"""The W8A8 and FP8 Triton kernels against their torch references (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.kernels.fp8_gemm import fp8_linear
from compressor.kernels.int8_linear import Int8Linear
from compressor.kernels.reference import (
    fp8_linear_ref,
    quantize_per_token_ref,
    scaled_gemm_ref,
    w8a8_linear_ref,
)
from compressor.kernels.scaled_gemm import scaled_gemm
from compressor.kernels.w8a8 import quantize_per_token, w8a8_linear
from tests.helpers.metrics import sqnr_db

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("m", "k"), [(1, 7), (37, 100), (5, 1500)])
def test_per_token_quantization_is_bit_exact(m: int, k: int) -> None:
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)).to(DEVICE)
    smooth = (torch.rand(k, generator=g) + 0.25).to(DEVICE)
    for s in (None, smooth):
        q, scale = quantize_per_token(x, s)
        q_ref, scale_ref = quantize_per_token_ref(x, s)
        assert torch.equal(scale, scale_ref)
        # on a GPU fp32 division may differ in the last ulp, moving a code across a tie
        assert (q.int() - q_ref.int()).abs().max() <= (0 if DEVICE == "cpu" else 1)


def test_per_token_rounding_is_half_to_even_and_saturates() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 64.5, -127.0]], device=DEVICE)
    q, scale = quantize_per_token(x)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 64, -127]]
    zero, s0 = quantize_per_token(torch.zeros(2, 40, device=DEVICE))
    assert not zero.any() and torch.isfinite(s0).all() and (s0 > 0).all()


@pytest.mark.parametrize("act", ["none", "gelu", "silu"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 48), (33, 100, 70), (70, 257, 33)])
def test_int8_gemm_matches_exact_integer_reference(act: str, m: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    sa = (torch.rand(m, generator=g) / 100).to(DEVICE)
    sb = (torch.rand(n, generator=g) / 100).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    got = scaled_gemm(a, b, sa, sb, bias, act, torch.float32)
    ref = scaled_gemm_ref(a, b, sa, sb, bias, act, torch.float32)
    # the int32 sums are exact; only the fp32 epilogue may differ in rounding
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_int8_gemm_accumulates_past_int16_without_saturating() -> None:
    k = 512  # 127 * 127 * 512 = 8.3e6: far past int16, the failure mode of vpmaddubsw engines
    a = torch.full((16, k), 127, dtype=torch.int8, device=DEVICE)
    b = torch.full((32, k), -127, dtype=torch.int8, device=DEVICE)
    one_m, one_n = torch.ones(16, device=DEVICE), torch.ones(32, device=DEVICE)
    got = scaled_gemm(a, b, one_m, one_n, None, "none", torch.float32)
    assert (got == -127 * 127 * k).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_w8a8_linear_matches_reference_and_int8linear(out_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    smooth = torch.rand(96) + 0.5
    layer = Int8Linear.from_linear(lin, "dynamic_per_token", smooth=smooth).eval().to(DEVICE)
    x = torch.randn(3, 11, 96, device=DEVICE)  # [..., K]: leading dims are flattened and restored
    qw = layer.qweight()
    got = w8a8_linear(x.to(out_dtype), qw, layer.weight_scale, layer.bias, layer.smooth, "none", out_dtype)
    ref = w8a8_linear_ref(
        x.to(out_dtype), qw, layer.weight_scale, layer.bias, layer.smooth, "none", out_dtype
    )
    assert got.shape == (3, 11, 40) and got.dtype == out_dtype
    floor = 60.0 if out_dtype == torch.float32 else 45.0  # fp16 output rounding
    assert sqnr_db(ref, got) > floor
    # the kernel computes what Int8Linear's reference path (the exported engine's math) computes
    with torch.no_grad():
        module_ref = Int8Linear.forward(layer.train(), x)  # training mode: always the torch path
    assert sqnr_db(module_ref, got.float()) > floor
    # and W8A8 stays close to the float layer it replaced
    with torch.no_grad():
        assert sqnr_db(lin.to(DEVICE)(x), got.float()) > 25.0


def test_w8a8_linear_rejects_bad_shapes() -> None:
    x = torch.randn(4, 32)
    w = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="K=31"):
        w8a8_linear(x[:, :31], w, torch.ones(8))
    with pytest.raises(ValueError, match="weight_scale has 7"):
        w8a8_linear(x, w, torch.ones(7))
    with pytest.raises(ValueError, match="int8"):
        w8a8_linear(x, w.float(), torch.ones(8))
    with pytest.raises(ValueError, match="relu"):
        w8a8_linear(x, w, torch.ones(8), act="relu")
    with pytest.raises(ValueError, match="smooth"):
        w8a8_linear(x, w, torch.ones(8), smooth=torch.ones(5))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token", "static"])
def test_fp8_linear_matches_reference(granularity: str) -> None:
    # E4M3 codes come from torch (the interpreter rounds fp32→fp8 casts wrongly); the
    # Triton part under test is the fp8 GEMM and its epilogue
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 9, 64, generator=g) * 3).to(DEVICE)
    w = torch.randn(24, 64, generator=g)
    w_scale = w.abs().amax(dim=1) / 448.0
    wq = (w / w_scale[:, None]).to(torch.float8_e4m3fn).to(DEVICE)
    bias = torch.randn(24, generator=g).to(DEVICE)
    static = (x.abs().amax() / 448.0).reshape(1) if granularity == "static" else None  # calibrated
    got = fp8_linear(x, wq, w_scale.to(DEVICE), bias, granularity, torch.float32, static)
    ref = fp8_linear_ref(x, wq, w_scale.to(DEVICE), bias, granularity, torch.float32, static)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert sqnr_db(x @ w.to(DEVICE).t() + bias, got) > 20.0  # E4M3 keeps ~3 mantissa bits


def test_fp8_gemm_needs_k_multiple_of_32() -> None:
    a = torch.zeros(4, 48).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="K=48"):
        scaled_gemm(a, a, torch.ones(4), torch.ones(4))


def test_int8linear_caches_inference_weights_until_they_change() -> None:
    layer = Int8Linear.from_linear(nn.Linear(32, 8)).eval()
    first = layer._inference_qweight()
    assert layer._inference_qweight() is first  # no re-quantization per call
    with torch.no_grad():
        layer.weight.mul_(-1.0)  # an in-place update (e.g. a distillation step) bumps the version
    again = layer._inference_qweight()
    assert again is not first and torch.equal(again, -first)
