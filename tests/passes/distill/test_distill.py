from __future__ import annotations

import torch

from compressor.distill.config import RecoverConfig
from compressor.distill.losses import evaluate_loss, layer_map, squarehead_loss
from compressor.kernels.int8_linear import Int8Linear
from compressor.passes.distill.distill import DistillPass
from compressor.passes.quantize.quantize import Int8Config, QuantizePass
from compressor.planning import PlanState


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


def test_quantization_aware_distillation_recovers_and_keeps_scales(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    q = QuantizePass(Int8Config(targets=("encoder.*",))).run(model, ctx).model
    scales = {n: m.weight_scale.clone() for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    cfg = RecoverConfig(steps=40, lr=1e-4, warmup_steps=2)
    before = evaluate_loss(q, ctx.teacher, adapter, ctx.data.eval, cfg.loss)  # held-out text
    p = DistillPass(cfg)
    assert p.plan(state := PlanState.from_model(q, ctx.target, adapter)) is state  # nothing changes form
    p.requires(q, ctx)
    out = p.run(q, ctx)
    p.ensures(out, ctx)
    assert out.model is q
    after = evaluate_loss(q, ctx.teacher, adapter, ctx.data.eval, cfg.loss)
    assert after < 0.8 * before, (before, after)
    assert out.details["loss_tail_mean"] < out.details["loss_first"]
    for n, m in q.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(m.weight_scale, scales[n]), n  # quantizers fixed
            assert m.qweight().abs().max() <= 127
    assert all(not p.requires_grad for p in ctx.teacher.parameters())


def test_distillation_batches_group_texts_by_length(tiny_bert_dir) -> None:
    """Grouped batches hold the same texts as plain ones, each once, with far less padding."""
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.recipe import DataSpec

    adapter = HFEncoderAdapter()
    adapter.load(str(tiny_bert_dir))
    spec = DataSpec(calibration_samples=8, train_samples=256, eval_samples=8, max_length=128, batch_size=16)
    plain = adapter.make_data(DataSpec(**{**spec.__dict__, "group_by_length": False}), seed=0).train
    grouped = adapter.make_data(spec, seed=0).train
    again = adapter.make_data(spec, seed=0).train

    def texts(batches):
        return sorted(
            tuple(ids[m.bool()].tolist())
            for b in batches
            for ids, m in zip(b["input_ids"], b["attention_mask"])
        )

    assert texts(grouped) == texts(plain) and len(texts(grouped)) == 256
    padded = [sum(b["input_ids"].numel() for b in bs) for bs in (plain, grouped)]
    assert padded[1] < 0.6 * padded[0], padded
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again))  # seeded
    widths = [b["input_ids"].shape[1] for b in grouped]
    assert widths != sorted(widths)  # the batch order is shuffled, not short-to-long
    assert adapter.make_data(DataSpec(**{**spec.__dict__, "train_samples": 0}), seed=0).train == []
