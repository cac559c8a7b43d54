"""Int4 RTN, GPTQ, AWQ and FP8 weight quantization math."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.fp8_format import FP8_DTYPE, fp8_error_bound, quantize_fp8
from compressor.kernels.int4_format import (
    dequantize_groupwise,
    pack_int4,
    quantize_rtn,
    unpack_int4,
)
from compressor.passes.common.hessian import hessian_from_inputs
from compressor.passes.quantize.awq import (
    awq_output_error,
    awq_search_clip,
    awq_search_scales,
    input_stats,
    row_output_error,
)
from compressor.passes.quantize.gptq import gptq_quantize
from compressor.passes.quantize.smoothquant import fold_input_scale_
from tests.helpers.tiny import correlated_inputs, rel_err

G = torch.Generator().manual_seed(3)
W = torch.randn(48, 128, generator=G)
X = correlated_inputs(1024, 128, seed=4)
H = hessian_from_inputs(X)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_codes_in_range_and_error_bounded(symmetric: bool, group_size: int) -> None:
    qw = quantize_rtn(W, 4, group_size, symmetric)
    assert qw.q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert qw.scales.shape == (48, 128 // group_size) and qw.zeros.shape == qw.scales.shape
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    # round-to-nearest error is at most half a step, per group
    step = qw.scales.repeat_interleave(group_size, dim=1)
    assert bool(((W - qw.dequantize()).abs() <= 0.5 * step + 1e-6).all())
    torch.testing.assert_close(dequantize_groupwise(qw.q, qw.scales, qw.zeros, group_size), qw.dequantize())


def test_int4_pack_round_trip() -> None:
    for sym in (True, False):
        q = quantize_rtn(W, 4, 32, sym).q
        packed = pack_int4(q)
        assert packed.shape == (48, 64) and packed.dtype == torch.uint8
        assert torch.equal(unpack_int4(packed, sym), q)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric", "act_order"),
    [(4, 128, True, False), (4, 32, False, False), (4, 64, True, True), (8, 128, True, False)],
)
def test_gptq_beats_rtn(bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    qg = gptq_quantize(W, H, bits, group_size, symmetric, act_order, blocksize=64)
    qr = quantize_rtn(W, bits, group_size, symmetric)
    # same format as RTN
    assert (
        qg.q.dtype == qr.q.dtype and qg.scales.shape == qr.scales.shape and qg.zeros.shape == qr.zeros.shape
    )
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(qg.q.min()) >= lo and int(qg.q.max()) <= hi
    e_g, e_r = rel_err(X, W, qg.dequantize()), rel_err(X, W, qr.dequantize())
    print(f"gptq w{bits} g{group_size} sym={symmetric} act_order={act_order}: {e_g:.4f} vs rtn {e_r:.4f}")
    assert e_g < 0.85 * e_r


def test_awq_beats_rtn_on_held_out_inputs() -> None:
    x = correlated_inputs(2048, 128, seed=5, outliers=4)
    calib, held_out = x[:1024], x[1024:]
    found = awq_search_scales(calib, [W], bits=4, group_size=128)
    assert found.alpha > 0 and found.error < found.errors["x^0"] == found.rtn_error
    e_awq = awq_output_error(held_out, [W], found.scales)
    e_rtn = awq_output_error(held_out, [W], torch.ones(128))
    print(f"awq alpha={found.alpha} duo={found.duo}: held-out rel sq err {e_awq:.5f} vs rtn {e_rtn:.5f}")
    assert e_awq < 0.7 * e_rtn


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_scale_search_is_never_worse_than_rtn_on_its_calibration(seed: int, group_size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(40, 128, generator=g),
        torch.randn(24, 128, generator=g) * 3,
    ]  # one input, two layers
    x = correlated_inputs(512, 128, seed=seed, outliers=seed)  # seed 0: no outlier channels
    found = awq_search_scales(x, weights, bits=4, group_size=group_size)
    rtn = awq_output_error(x, weights, torch.ones(128), group_size=group_size)
    chosen = awq_output_error(x, weights, found.scales, group_size=group_size)
    # the Gram-matrix errors the search ranks by are the errors on the rows themselves
    assert found.rtn_error == pytest.approx(rtn, rel=1e-3)
    assert found.error == pytest.approx(chosen, rel=1e-3)
    assert chosen <= rtn * (1 + 1e-4), (found.alpha, found.duo, chosen, rtn)
    assert min(found.errors.values()) == found.error
    if seed >= 2:  # outlier input channels: scaling must win clearly
        assert chosen < 0.8 * rtn, (found.alpha, chosen, rtn)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clip_search_never_increases_any_output_rows_error(seed: int, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    # heavy-tailed weights: a few large entries per group stretch the RTN range
    w[torch.rand(w.shape, generator=g) < 0.01] *= 8.0
    x = correlated_inputs(512, 128, seed=seed, outliers=2)
    st = input_stats(x)
    ratios = awq_search_clip(w, st.gram, 4, 32, symmetric)
    assert ratios.shape == (64, 4) and float(ratios.min()) >= 0.5 and float(ratios.max()) <= 1.0
    clipped = awq_output_error(x, [w], torch.ones(128), 4, 32, symmetric, clip_ratios=[ratios])
    plain = awq_output_error(x, [w], torch.ones(128), 4, 32, symmetric)
    print(
        f"seed {seed} sym={symmetric}: clipped {clipped:.5f} vs plain {plain:.5f}, {float((ratios < 1).float().mean()):.0%}"
    )
    assert clipped < 0.95 * plain  # the search does something on heavy-tailed weights
    g64 = x.double().t() @ x.double()
    per_row_clip = row_output_error(w, quantize_rtn(w, 4, 32, symmetric, ratios).dequantize(), g64)
    per_row_plain = row_output_error(w, quantize_rtn(w, 4, 32, symmetric).dequantize(), g64)
    assert bool((per_row_clip <= per_row_plain * (1 + 1e-9)).all())


def test_per_group_clip_ratios_shrink_only_their_group() -> None:
    w = torch.randn(4, 64)
    ratios = torch.ones(4, 2)
    ratios[1, 0] = 0.5
    qc, qp = quantize_rtn(w, 4, 32, True, ratios), quantize_rtn(w, 4, 32, True)
    assert torch.allclose(qc.scales[1, 0], qp.scales[1, 0] * 0.5)
    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.equal(qc.scales[mask], qp.scales[mask])


def test_awq_scales_fold_exactly() -> None:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    ref = lin(norm(x))
    fold_input_scale_(norm, [lin], torch.rand(16) + 0.5)
    torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_fp8_round_trip_within_bound(granularity: str) -> None:
    w = W.clone()
    w[3] *= 100.0  # one loud row: per-channel must not crush the others
    w[5] = 0.0  # an all-zero row must still get a finite scale
    f = quantize_fp8(w, granularity)
    assert f.data.dtype == FP8_DTYPE
    assert bool(torch.isfinite(f.scale).all()) and bool((f.scale > 0).all())
    assert f.scale.shape == ((48, 1) if granularity == "per_channel" else ())
    err = (w - f.dequantize()).abs()
    assert bool((err <= fp8_error_bound(w, f.scale) + 1e-12).all())
    assert float(f.data.float().abs().max()) == 448.0
    rel = float(err.norm() / w.norm())
    print(f"fp8 {granularity}: rel err {rel:.5f}")
    assert rel < 0.04
