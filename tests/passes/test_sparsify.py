from __future__ import annotations

import pytest
import torch
from compressor.kernels.int8_linear import Int8Linear
from compressor.passes.quantize import QuantizeConfig, QuantizePass
from compressor.passes.sparsify import SparsifyConfig, SparsifyPass, is_24_sparse, mask_24_by_magnitude

from compressor.distill import RecoverConfig, distill_
from compressor.errors import PlanError


def test_mask_keeps_the_two_largest_of_every_four() -> None:
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.1, 0.0]])
    assert mask_24_by_magnitude(w).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert is_24_sparse(w * mask_24_by_magnitude(w))
    assert not is_24_sparse(w)


def test_24_survives_distillation_and_quantization(tiny_ctx) -> None:  # type: ignore[no-untyped-def]
    adapter, model, ctx = tiny_ctx
    p = SparsifyPass(SparsifyConfig(targets=("encoder.*",)))
    p.check(model, ctx.target, adapter)
    p.run(model, ctx)
    p.ensures(model, ctx)
    before = adapter.metrics(model, ctx.teacher, ctx.data.eval)
    for name, m in model.named_modules():
        if name.startswith("encoder") and isinstance(m, torch.nn.Linear):
            assert float((m.weight == 0).float().mean()) == 0.5, name
    assert 0.45 < before["linear_sparsity"] < 0.5  # the pooler stays dense
    losses = distill_(
        model, ctx.teacher, adapter, ctx.data.train, RecoverConfig(steps=30, lr=1e-3, warmup_steps=2)
    )
    for name, m in model.named_modules():
        if name.startswith("encoder") and isinstance(m, torch.nn.Linear):
            assert is_24_sparse(m.weight), name
    after = adapter.metrics(model, ctx.teacher, ctx.data.eval)
    assert after["mean_cosine"] > before["mean_cosine"], (before, after)  # recovery recovered
    assert sum(losses[-5:]) < sum(losses[:5])
    q = QuantizePass(QuantizeConfig(targets=("encoder.*",))).run(model, ctx)
    layers = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 12
    for m in layers:
        assert is_24_sparse(m.qweight().float())


def test_sparsify_refuses_patterns_that_match_nothing(tiny_ctx) -> None:  # type: ignore[no-untyped-def]
    adapter, model, ctx = tiny_ctx
    with pytest.raises(PlanError, match="sparsify: target pattern 'encoder.layer.9.\\*' matches no"):
        SparsifyPass(SparsifyConfig(targets=("encoder.layer.9.*",))).check(model, ctx.target, adapter)
