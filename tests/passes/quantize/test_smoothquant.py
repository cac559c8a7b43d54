from __future__ import annotations

import pytest
import torch

from compressor.passes.quantize.smoothquant import (
    fold_input_scale_,
    smoothquant_alpha_search,
    smoothquant_scales,
    w8a8_output_error,
)
from tests.helpers.tiny import correlated_inputs


def test_scales_follow_the_formula() -> None:
    amax = torch.tensor([1.0, 16.0, 4.0, 0.0])
    w1 = torch.tensor([[1.0, 0.5, -2.0, 1.0]])
    w2 = torch.tensor([[-4.0, 0.25, 1.0, 1.0]])
    s = smoothquant_scales(amax, [w1, w2], alpha=0.5)
    # max|W_j| over both linears = [4, 0.5, 2, 1]; s = sqrt(amax / wmax); dead channel -> 1
    torch.testing.assert_close(s, torch.tensor([0.5, (16 / 0.5) ** 0.5, (4 / 2) ** 0.5, 1.0]))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(amax, [w1], alpha=1.5)


def test_alpha_search_beats_no_smoothing_on_outlier_activations() -> None:
    x = correlated_inputs(2048, 64, seed=11, outliers=3)
    g = torch.Generator().manual_seed(12)
    weights = [torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g)]
    alpha, s, errors = smoothquant_alpha_search(x[:1024], weights)
    assert set(errors) >= {0.0, 0.5, 1.0} and errors[alpha] == min(errors.values())
    e_smooth = w8a8_output_error(x[1024:], weights, s)
    e_plain = w8a8_output_error(x[1024:], weights, torch.ones(64))
    print(f"smoothquant alpha={alpha}: held-out W8A8 rel sq err {e_smooth:.2e} vs unsmoothed {e_plain:.2e}")
    assert e_smooth < 0.5 * e_plain


def test_folding_into_rmsnorm_like_producer_and_linear_producer_is_exact() -> None:
    torch.manual_seed(0)
    v = torch.nn.Linear(8, 16)
    o = torch.nn.Linear(16, 4)
    x = torch.randn(3, 8)
    ref = o(v(x))
    fold_input_scale_(v, [o], torch.rand(16) + 0.5)
    torch.testing.assert_close(o(v(x)), ref, rtol=1e-5, atol=1e-5)
