"""The prune pass's plan: the widths and Linear shapes the passes after it judge."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compressor.adapters.base import DataSplits
from compressor.errors import PassError, PlanError
from compressor.passes.prune.prune import StructuredPruneConfig, StructuredPrunePass
from compressor.passes.sparsity.sparsify import SparsifyConfig, SparsifyPass
from compressor.pipeline import PassContext, PassOutput
from compressor.planning import PlanState, plan_passes
from compressor.targets import TARGETS
from tests.helpers.tiny import TinyAdapter, tiny_bert, tiny_llama, token_batches


def _state(model: torch.nn.Module) -> PlanState:
    return PlanState.from_model(model, TARGETS["cpu"], TinyAdapter())


def _shapes(state: PlanState) -> dict[str, tuple[int, int]]:
    return {n: (lin.in_features, lin.out_features) for n, lin in state.linears.items()}


def _run(p: StructuredPrunePass, model: torch.nn.Module) -> PassOutput:
    ctx = PassContext(TARGETS["cpu"], TinyAdapter(), model, DataSplits(token_batches(2), [], []))
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    return out


def test_a_check_after_prune_sees_the_pruned_ffn_width_and_no_dropped_layer() -> None:
    model = tiny_bert(layers=4)
    prune = StructuredPrunePass(StructuredPruneConfig(ffn=0.5, layers=3))
    sparsify = SparsifyPass(SparsifyConfig(targets=(r"re:encoder\.layer\.\d+\.output\.dense",)))
    start, pruned, sparse = plan_passes(_state(model), [prune, sparsify])
    assert pruned.widths == {"heads": 4, "ffn": 64, "layers": 3}
    assert start.linears["encoder.layer.0.intermediate.dense"].out_features == 128
    assert pruned.linears["encoder.layer.0.intermediate.dense"].out_features == 64
    assert pruned.linears["encoder.layer.2.output.dense"].in_features == 64
    assert pruned.linears["encoder.layer.2.output.dense"].by == "passes[0] (prune)"
    assert not any(n.startswith("encoder.layer.3.") for n in pruned.linears)
    assert pruned.linears["pooler.dense"] == start.linears["pooler.dense"]
    # the sparsify after it selects among the layers the prune leaves, at their new width
    chosen = {n: lin.in_features for n, lin in sparse.linears.items() if lin.sparse24}
    assert chosen == {f"encoder.layer.{i}.output.dense": 64 for i in range(3)}
    out = _run(prune, model)
    assert _shapes(_state(out.model)) == _shapes(pruned)  # the plan is what the run leaves


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_planned_llama_shapes_are_the_pruned_model_shapes(kv_heads: int) -> None:
    model = tiny_llama(layers=3, kv_heads=kv_heads)
    p = StructuredPrunePass(StructuredPruneConfig(heads=2, ffn=96, layers=2))
    start = _state(model)
    planned = p.plan(start)
    assert planned.widths == {"heads": 2, "ffn": 96, "layers": 2}
    # MHA: k loses 2 of its 4 heads with q; GQA: both key/value heads stay
    assert start.linears["model.layers.1.self_attn.k_proj"].out_features == 16 * kv_heads
    assert planned.linears["model.layers.1.self_attn.k_proj"].out_features == 32
    assert planned.linears["model.layers.0.self_attn.q_proj"].out_features == 32
    assert planned.linears["model.layers.0.self_attn.o_proj"].in_features == 32
    assert planned.linears["model.layers.1.mlp.down_proj"].in_features == 96
    assert "model.layers.2.mlp.up_proj" not in planned.linears
    assert _shapes(_state(_run(p, model).model)) == _shapes(planned)


def test_a_second_prune_is_judged_on_the_widths_the_first_leaves() -> None:
    model = tiny_llama(layers=4, kv_heads=4)
    first = StructuredPrunePass(StructuredPruneConfig(heads=2, ffn=96, layers=3))
    after_first = first.plan(_state(model))
    with pytest.raises(PlanError, match="prune: prune.ffn: cannot keep 100, the model has only 96"):
        StructuredPrunePass(StructuredPruneConfig(ffn=100)).plan(after_first)
    with pytest.raises(PlanError, match="prune.layers: cannot keep 4, the model has only 3"):
        StructuredPrunePass(StructuredPruneConfig(layers=4)).plan(after_first)
    second = StructuredPrunePass(StructuredPruneConfig(heads=1, ffn=0.5))
    after_second = second.plan(after_first)
    assert after_second.widths == {"heads": 1, "ffn": 48, "layers": 3}
    # multi-head attention: k/v were pruned with q by the first prune, and are again
    assert after_second.linears["model.layers.2.self_attn.v_proj"].out_features == 16
    _run(first, model)
    _run(second, model)
    assert _shapes(_state(model)) == _shapes(after_second)


def test_prune_plans_rebuilt_layers_dense_and_keeps_the_others() -> None:
    model = tiny_bert(layers=3)
    state = SparsifyPass(SparsifyConfig(targets=("encoder.layer.*",))).plan(_state(model))
    pruned = StructuredPrunePass(StructuredPruneConfig(ffn=64)).plan(state)
    for i in range(3):
        base = f"encoder.layer.{i}"
        assert not pruned.linears[f"{base}.intermediate.dense"].sparse24  # a new Linear, no mask
        assert not pruned.linears[f"{base}.output.dense"].sparse24  # its columns are no longer 2:4
        assert pruned.linears[f"{base}.attention.self.query"].sparse24  # untouched
    # which layers a depth prune keeps is known at run time only: 2:4 where every layer is
    only_first = SparsifyPass(SparsifyConfig(targets=("encoder.layer.0.*",))).plan(_state(model))
    shallower = StructuredPrunePass(StructuredPruneConfig(layers=2)).plan(only_first)
    assert not any(lin.sparse24 for lin in shallower.linears.values())


def test_prune_refuses_layers_an_earlier_pass_quantized() -> None:
    model = tiny_bert()
    state = _state(model)
    name = "encoder.layer.1.attention.self.key"
    int8 = dataclasses.replace(state.linears[name], form="int8", by="passes[0] (quantize)")
    with pytest.raises(PlanError, match=f"prune: {name} is int8 \\(from passes\\[0\\] \\(quantize\\)\\)"):
        StructuredPrunePass(StructuredPruneConfig(layers=1)).plan(state.with_linears({name: int8}))


def test_ensures_compares_the_tensors_with_the_widths_run_recorded() -> None:
    model = tiny_bert()
    p = StructuredPrunePass(StructuredPruneConfig(ffn=64))
    ctx = PassContext(TARGETS["cpu"], TinyAdapter(), model, DataSplits(token_batches(1), [], []))
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    wrong = PassOutput(out.model, {**out.details, "widths": {"heads": 4, "ffn": 32, "layers": 2}})
    with pytest.raises(PassError, match="differ from the plan"):
        p.ensures(wrong, ctx)
