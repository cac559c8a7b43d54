from __future__ import annotations

import torch
from compressor.kernels.int8_linear import Int8Linear
from compressor.passes.distill import DistillConfig, DistillPass
from compressor.passes.quantize import QuantizeConfig, QuantizePass

from compressor.distill import evaluate_loss, layer_map, squarehead_loss


def test_layer_map_for_pruned_depth() -> None:
    assert layer_map(6, 6) == list(range(6))
    assert layer_map(3, 6) == [1, 3, 5]
    assert layer_map(2, 12) == [5, 11]


def test_squarehead_is_normalised_per_layer() -> None:
    t = [torch.ones(2, 3, 4), 100 * torch.ones(2, 3, 4)]
    s = [1.1 * t[0], 1.1 * t[1]]  # the same 10 % error on layers of very different scale
    mask = torch.ones(2, 3)
    assert abs(float(squarehead_loss(s, t, mask)) - 0.01) < 1e-6
    mask[:, 2] = 0
    s[0][:, 2] = 50.0  # errors on padding do not count
    assert abs(float(squarehead_loss(s, t, mask)) - 0.01) < 1e-6


def test_quantization_aware_distillation_recovers_and_keeps_scales(tiny_ctx) -> None:  # type: ignore[no-untyped-def]
    adapter, model, ctx = tiny_ctx
    q = QuantizePass(QuantizeConfig(targets=("encoder.*",))).run(model, ctx)
    scales = {n: m.weight_scale.clone() for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    cfg = DistillConfig(steps=40, lr=1e-4, warmup_steps=2)
    before = evaluate_loss(q, ctx.teacher, adapter, ctx.data.eval, cfg.loss)  # held-out text
    p = DistillPass(cfg)
    p.requires(q, ctx)
    p.run(q, ctx)
    after = evaluate_loss(q, ctx.teacher, adapter, ctx.data.eval, cfg.loss)
    assert after < 0.8 * before, (before, after)
    assert ctx.details["loss_tail_mean"] < ctx.details["loss_first"]
    for n, m in q.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(m.weight_scale, scales[n]), n  # quantizers fixed
            assert m.qweight().abs().max() <= 127
    assert all(not p.requires_grad for p in ctx.teacher.parameters())
