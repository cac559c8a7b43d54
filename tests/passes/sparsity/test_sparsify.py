from __future__ import annotations

import pytest
import torch

from compressor.distill.config import RecoverConfig
from compressor.distill.loop import distill_
from compressor.errors import PlanError
from compressor.kernels.int8_linear import Int8Linear
from compressor.passes.quantize.quantize import Int8Config, QuantizePass
from compressor.passes.sparsity.sparsify import (
    SparsifyConfig,
    SparsifyPass,
    is_24_sparse,
    mask_24_by_magnitude,
)
from compressor.planning import PlanState


def test_mask_keeps_the_two_largest_of_every_four() -> None:
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.1, 0.0]])
    assert mask_24_by_magnitude(w).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert is_24_sparse(w * mask_24_by_magnitude(w))
    assert not is_24_sparse(w)


def test_24_survives_distillation_and_quantization(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    p = SparsifyPass(SparsifyConfig(targets=("encoder.*",)))
    state = p.plan(PlanState.from_model(model, ctx.target, adapter))
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    model = out.model
    planned = {n for n, lin in state.linears.items() if lin.sparse24}
    assert planned == {n for n in state.linears if n.startswith("encoder")} and len(planned) == 12
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
    q = QuantizePass(Int8Config(targets=("encoder.*",))).run(model, ctx).model
    layers = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 12
    for m in layers:
        assert is_24_sparse(m.qweight().float())


def test_sparsify_refuses_patterns_that_match_nothing(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    with pytest.raises(PlanError, match="sparsify: target pattern 'encoder.layer.9.\\*' matches no"):
        SparsifyPass(SparsifyConfig(targets=("encoder.layer.9.*",))).plan(
            PlanState.from_model(model, ctx.target, adapter)
        )


def test_sparsegpt_beats_magnitude_on_the_model(tiny_ctx) -> None:
    import copy

    adapter, model, ctx = tiny_ctx
    scores, details = {}, {}
    for method in ("magnitude", "sparsegpt"):
        p = SparsifyPass(SparsifyConfig(method=method, targets=("encoder.*",)))
        out = p.run(copy.deepcopy(model), ctx)
        p.ensures(out, ctx)
        scores[method] = adapter.metrics(out.model, ctx.teacher, ctx.data.eval)["mean_cosine"]
        details = dict(out.details)
    assert details["sparsegpt_layers"] == 12 and details["magnitude_layers"] == []
    assert 1 - scores["sparsegpt"] < 1 - scores["magnitude"], scores


def _dense_encoder_layers(model: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if n.startswith("encoder") and isinstance(m, torch.nn.Linear) and not is_24_sparse(m.weight)
    ]


def test_mixed_sparsity_keeps_the_most_sensitive_layers_dense_until_the_budget_holds(tiny_ctx) -> None:
    import copy

    adapter, model, ctx = tiny_ctx
    all_sparse = (
        SparsifyPass(SparsifyConfig(method="sparsegpt", targets=("encoder.*",)))
        .run(copy.deepcopy(model), ctx)
        .model
    )
    cos_all = adapter.metrics(all_sparse, ctx.teacher, ctx.data.calibration[:4])["mean_cosine"]
    budget = (1 - cos_all) / 2  # half the loss of the all-2:4 model
    p = SparsifyPass(
        SparsifyConfig(
            method="sparsegpt", targets=("encoder.*",), max_dense_layers=12, fidelity_budget=budget
        )
    )
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    dense, per_layer = out.details["dense_layers"], out.details["per_layer"]
    assert 0 < len(dense) < 12 and sorted(dense) == sorted(_dense_encoder_layers(model))
    for n in dense:  # dense again: the original weights, no mask for distillation to re-apply
        lin = model.get_submodule(n)
        assert getattr(lin, "weight_mask", None) is None
        torch.testing.assert_close(lin.weight, ctx.teacher.get_submodule(n).weight)
    # the kept layers are the most sensitive ones, and the manifest says so
    ranks = sorted(per_layer[n]["rank"] for n in dense)
    assert ranks == list(range(1, len(dense) + 1))
    assert all(
        per_layer[n]["precision"] == "dense" and "fidelity_budget" in per_layer[n]["why"] for n in dense
    )
    assert out.details["mixed_sparsity"]["reached"] is True
    trace = out.details["mixed_sparsity"]["mean_cosine_by_dense_layers"]
    assert trace[-1] >= 1 - budget > trace[0]
    cos = adapter.metrics(model, ctx.teacher, ctx.data.calibration[:4])["mean_cosine"]
    assert cos >= 1 - budget - 1e-6 and cos > cos_all


def test_mixed_sparsity_budget_needs_dense_layers() -> None:
    from compressor.config import from_dict
    from compressor.errors import RecipeError

    with pytest.raises(RecipeError, match=r"p.fidelity_budget: needs max_dense_layers > 0"):
        from_dict(SparsifyConfig, {"fidelity_budget": 0.01}, "p")
    with pytest.raises(RecipeError, match=r"p.fidelity_budget: 1.5 is not in \[0, 1\)"):
        from_dict(SparsifyConfig, {"fidelity_budget": 1.5, "max_dense_layers": 2}, "p")


def test_sparsify_plan_marks_the_selected_float_layers_and_refuses_odd_widths(tiny_ctx) -> None:
    import dataclasses

    adapter, model, ctx = tiny_ctx
    state = PlanState.from_model(model, ctx.target, adapter)
    p = SparsifyPass(SparsifyConfig(targets=("encoder.layer.0.*",), ignore=("*.query",)))
    after = p.plan(state.replace(where="passes[0] (sparsify)"))
    sparse = sorted(n for n, lin in after.linears.items() if lin.sparse24)
    assert sparse == sorted(
        n for n in state.linears if n.startswith("encoder.layer.0.") and not n.endswith(".query")
    )
    assert {after.linears[n].by for n in sparse} == {"passes[0] (sparsify)"}
    assert after.linears["pooler.dense"] == state.linears["pooler.dense"]
    # a layer an earlier pass quantized is no nn.Linear when sparsify runs: no candidate
    int8 = {n: dataclasses.replace(lin, form="int8") for n, lin in state.linears.items() if "layer.1." in n}
    with pytest.raises(PlanError, match="sparsify: target pattern 'encoder.layer.1.\\*' matches no"):
        SparsifyPass(SparsifyConfig(targets=("encoder.layer.1.*",))).plan(state.with_linears(int8))
    odd = state.with_linears(
        {"pooler.dense": dataclasses.replace(state.linears["pooler.dense"], in_features=30)}
    )
    with pytest.raises(PlanError, match="2:4 needs in_features divisible by 4; not so for pooler.dense"):
        SparsifyPass(SparsifyConfig(targets=("pooler.*",))).plan(odd)
