from __future__ import annotations

import pytest
import torch

from compressor.passes.common.hessian import HessianAccumulator, hessian_from_inputs
from compressor.passes.sparsity.sparsegpt import magnitude_prune, sparsegpt_prune
from tests.helpers.tiny import correlated_inputs, rel_err


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(1024, 128, seed=1)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    return x, w, hessian_from_inputs(x)


def test_hessian_accumulates_mean_of_2xtx() -> None:
    x = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    for chunk in x.split(30):
        acc.add_batch(chunk)
    torch.testing.assert_close(acc.hessian, 2 * x.t() @ x / 100, rtol=1e-5, atol=1e-5)
    assert acc.num_samples == 100


def test_sparsegpt_24_beats_magnitude_and_pattern_is_exact(layer) -> None:
    x, w, h = layer
    w_sgpt, keep = sparsegpt_prune(w, h, prune_n=2, prune_m=4, blocksize=32)
    w_mag, _ = magnitude_prune(w, prune_n=2, prune_m=4)
    zeros_per_group = (w_sgpt == 0).reshape(64, 32, 4).sum(dim=2)
    assert bool((zeros_per_group >= 2).all())
    assert bool((w_sgpt[~keep] == 0).all()) and int(keep.sum()) == w.numel() // 2
    e_sgpt, e_mag = rel_err(x, w, w_sgpt), rel_err(x, w, w_mag)
    print(f"2:4 rel err: sparsegpt {e_sgpt:.4f} magnitude {e_mag:.4f} ratio {e_sgpt / e_mag:.3f}")
    assert e_sgpt < 0.8 * e_mag


def test_sparsegpt_unstructured_hits_ratio_and_beats_magnitude(layer) -> None:
    x, w, h = layer
    w_sgpt, _ = sparsegpt_prune(w, h, sparsity=0.6, blocksize=64)
    w_mag, _ = magnitude_prune(w, sparsity=0.6)
    assert abs(float((w_sgpt == 0).float().mean()) - 0.6) < 0.01
    e_sgpt, e_mag = rel_err(x, w, w_sgpt), rel_err(x, w, w_mag)
    print(f"60% rel err: sparsegpt {e_sgpt:.4f} magnitude {e_mag:.4f} ratio {e_sgpt / e_mag:.3f}")
    assert e_sgpt < 0.8 * e_mag


def test_sparsegpt_rejects_bad_pattern(layer) -> None:
    _, w, h = layer
    with pytest.raises(ValueError, match="n < m"):
        sparsegpt_prune(w, h, prune_n=4, prune_m=4)
    with pytest.raises(ValueError, match="hessian shape"):
        sparsegpt_prune(w, h[:10, :10])
