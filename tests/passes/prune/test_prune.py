"""Structured pruning on tiny BERT and Llama: shapes, parameter counts, reload, fidelity."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from compressor.adapters.base import DataSplits
from compressor.config import from_dict
from compressor.distill.losses import layer_map, origin_layers, squarehead_loss
from compressor.errors import PassError, PlanError, RecipeError
from compressor.passes.prune.importance import activation_importance, random_importance
from compressor.passes.prune.prune import (
    PrunePlan,
    StructuredPruneConfig,
    StructuredPrunePass,
    check_anatomy,
    prune_structured_,
)
from compressor.passes.prune.structure import count_parameters, describe_model
from compressor.pipeline import PASS_REGISTRY, PassContext, PassOutput
from compressor.planning import PlanState
from compressor.targets import TARGETS
from tests.helpers.tiny import TinyAdapter, model_output, tiny_bert, tiny_llama, token_batches


def _ctx(model: torch.nn.Module, batches: list) -> PassContext:
    return PassContext(TARGETS["cpu"], TinyAdapter(), model, DataSplits(batches, [], []))


def _fwd(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model_output(model, batch)


def _reload_identical(model: torch.nn.Module, tmp_path: Path, auto: type, batch: dict) -> torch.nn.Module:
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert count_parameters(reloaded) == count_parameters(model)
    torch.testing.assert_close(model_output(reloaded, batch), model_output(model, batch), rtol=0, atol=0)
    return reloaded


def test_bert_ffn_and_layers_shrink_and_reload(tmp_path: Path) -> None:
    model = tiny_bert(layers=4)
    batches = token_batches(2)
    before = count_parameters(model)
    p = StructuredPrunePass(from_dict(StructuredPruneConfig, {"ffn": 0.5, "layers": 3}, "prune"))
    p.plan(PlanState.from_model(model, TARGETS["cpu"], TinyAdapter()))
    ctx = _ctx(model, batches)
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    # per layer: intermediate.dense loses 64 rows (64*64 + 64 bias), output.dense loses 64 columns
    per_layer = sum(x.numel() for x in tiny_bert(layers=1).encoder.layer[0].parameters())
    expected = before - 3 * (64 * 64 + 64 + 64 * 64) - per_layer
    assert count_parameters(model) == expected
    assert model.config.intermediate_size == 64 and model.config.num_hidden_layers == 3
    assert out.details["parameters"] == {"before": before, "after": expected}
    _reload_identical(model, tmp_path, AutoModel, batches[0])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_heads_ffn_layers_shrink_and_reload(tmp_path: Path, kv_heads: int) -> None:
    model = tiny_llama(layers=3, kv_heads=kv_heads)
    batches = token_batches(2)
    before = count_parameters(model)
    cfg = from_dict(StructuredPruneConfig, {"heads": 2, "ffn": 96, "layers": 2}, "prune")
    p = StructuredPrunePass(cfg)
    ctx = _ctx(model, batches)
    p.plan(PlanState.from_model(model, TARGETS["cpu"], TinyAdapter()))
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    hd = 16
    heads_removed = 2 * (2 * hd * 64)  # 2 heads: q rows + o cols
    kv_removed = 2 * (2 * hd * 64) if kv_heads == 4 else 0  # k and v rows (MHA only)
    ffn_removed = 3 * 32 * 64  # gate, up rows and down cols
    layer_params = sum(
        x.numel() for x in tiny_llama(layers=1, kv_heads=kv_heads).model.layers[0].parameters()
    )
    pruned_layer = layer_params - heads_removed - kv_removed - ffn_removed
    expected = before - 3 * layer_params + 2 * pruned_layer
    assert count_parameters(model) == expected
    c = model.config
    assert (c.num_attention_heads, c.head_dim, c.intermediate_size, c.num_hidden_layers) == (2, 16, 96, 2)
    assert c.num_key_value_heads == 2  # MHA: k/v heads pruned with q; GQA: all 2 groups kept
    reloaded = _reload_identical(model, tmp_path, AutoModelForCausalLM, batches[0])
    assert reloaded.model.layers[1].self_attn.layer_idx == 1


def test_qwen2_gqa_heads_reload(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=3,
        vocab_size=100,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    batches = token_batches(2)
    p = StructuredPrunePass(StructuredPruneConfig(heads=2, ffn=0.5, layers=2))
    ctx = _ctx(model, batches)
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    # one query head kept in each of the two key/value groups (heads 0-1 and 2-3)
    assert all(h[0] < 2 <= h[1] for h in out.details["kept"]["heads"])
    assert len(model.config.layer_types) == 2 and model.config.head_dim == 16
    _reload_identical(model, tmp_path, AutoModelForCausalLM, batches[0])


def _ffn_fidelity(method: str, seed: int) -> float:
    """Relative output error after keeping 32 of 128 FFN channels in a BERT whose
    channel importance is uneven (as in trained models)."""
    model = tiny_bert(layers=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.encoder.layer:
            # a quarter of the channels carry most of the FFN output
            gain = torch.where(torch.rand(128, generator=g) < 0.25, 4.0, 0.25)
            layer.output.dense.weight.mul_(gain[None, :])
    batches = token_batches(4, seed=1)
    held_out = token_batches(2, seed=2)
    ref = [model_output(model, b) for b in held_out]
    anatomy = describe_model(model)
    if method == "activation":
        scores = activation_importance(model, anatomy, batches, _fwd)
    else:
        scores = random_importance(anatomy, seed)
    prune_structured_(anatomy, scores, PrunePlan(4, 32, 2))
    out = [model_output(model, b) for b in held_out]
    return float(sum((o - r).norm() for o, r in zip(out, ref)) / sum(r.norm() for r in ref))


def _head_fidelity(method: str, seed: int) -> float:
    model = tiny_llama(layers=2, kv_heads=4)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            # heads 1 and (2 in layer 1) dominate; the others are nearly silent
            gain = torch.full((4,), 0.1)
            gain[1] = 3.0
            gain[2 if i else 3] = 3.0
            layer.self_attn.o_proj.weight.mul_(gain.repeat_interleave(16)[None, :])
    batches = token_batches(3, seed=1)
    held_out = token_batches(2, seed=2)
    ref = [model_output(model, b) for b in held_out]
    anatomy = describe_model(model)
    scores = activation_importance(model, anatomy, batches, _fwd) if method == "activation" else None
    if scores is None:
        scores = random_importance(anatomy, seed)
    prune_structured_(anatomy, scores, PrunePlan(2, 128, 2))
    out = [model_output(model, b) for b in held_out]
    return float(sum((o - r).norm() for o, r in zip(out, ref)) / sum(r.norm() for r in ref))


@pytest.mark.parametrize("fidelity", [_ffn_fidelity, _head_fidelity])
def test_activation_importance_beats_random(fidelity) -> None:
    e_act = fidelity("activation", 0)
    e_rand = [fidelity("random", s) for s in range(4)]
    mean_rand = sum(e_rand) / len(e_rand)
    print(
        f"{fidelity.__name__}: activation {e_act:.4f} random mean {mean_rand:.4f} ({e_act / mean_rand:.3f})"
    )
    assert e_act < 0.5 * mean_rand


def test_layer_importance_drops_the_identity_like_layer() -> None:
    model = tiny_llama(layers=4)
    with torch.no_grad():  # layer 2 barely changes its input
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    anatomy = describe_model(model)
    scores = activation_importance(model, anatomy, token_batches(2), _fwd)
    assert int(torch.argmin(scores.layers)) == 2
    kept = prune_structured_(anatomy, scores, PrunePlan(4, 128, 3))
    assert kept["layers"] == [0, 1, 3]


def test_distillation_matches_kept_layers_to_their_origin() -> None:
    """After depth pruning, each kept layer's hidden state is compared with the teacher's at
    the layer it was cut from (composed over two prunes), not at evenly spread depths."""
    teacher = tiny_llama(layers=4)
    with torch.no_grad():  # layer 0 barely changes its input: it is the one dropped
        teacher.model.layers[0].self_attn.o_proj.weight.mul_(1e-3)
        teacher.model.layers[0].mlp.down_proj.weight.mul_(1e-3)
    student = copy.deepcopy(teacher)
    batches = token_batches(2)
    StructuredPrunePass(StructuredPruneConfig(layers=3)).run(student, _ctx(student, batches))
    assert origin_layers(student) == [1, 2, 3] and layer_map(3, 4, [1, 2, 3]) == [1, 2, 3]

    def hidden(model: torch.nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(model(**batches[0], output_hidden_states=True).hidden_states[1:])

    mask = batches[0]["attention_mask"]
    by_origin = float(squarehead_loss(hidden(student), hidden(teacher), mask, origin_layers(student)))
    evenly = float(squarehead_loss(hidden(student), hidden(teacher), mask))  # teacher layers 0, 2, 3
    assert by_origin < 1e-4 < evenly, (by_origin, evenly)

    StructuredPrunePass(StructuredPruneConfig(layers=2, layer_importance="random")).run(
        student, _ctx(student, batches)
    )
    origin = origin_layers(student)
    assert origin is not None and len(origin) == 2 and set(origin) <= {1, 2, 3} and origin == sorted(origin)
    assert layer_map(2, 4, [0, 7]) == [1, 3]  # an origin that does not fit: evenly spread


def test_check_refuses_impossible_widths() -> None:
    bert, llama_gqa = tiny_bert(), tiny_llama(kv_heads=2)
    adapter, cpu = TinyAdapter(), TARGETS["cpu"]
    cases = [
        (bert, {"heads": 2}, "cannot lose heads"),
        (bert, {"ffn": 256}, "cannot keep 256, the model has only 128"),
        (bert, {"layers": 3}, "cannot keep 3, the model has only 2"),
        (llama_gqa, {"heads": 3}, "not a multiple of num_key_value_heads=2"),
        (bert, {"ffn": 100, "ffn_multiple_of": 64}, "not a multiple of 64"),
    ]
    for model, options, message in cases:
        p = StructuredPrunePass(from_dict(StructuredPruneConfig, options, "passes[0]"))
        with pytest.raises(PlanError, match=message):
            p.plan(PlanState.from_model(model, cpu, adapter))
    with pytest.raises(RecipeError, match="passes\\[0\\].ffn: fraction 1.5"):
        from_dict(StructuredPruneConfig, {"ffn": 1.5}, "passes[0]")
    assert from_dict(StructuredPruneConfig, {"recover": {"steps": 20}}, "passes[0]").recover.steps == 20
    with pytest.raises(RecipeError, match=r"passes\[0\]\.recover\.epochs: unknown key"):
        from_dict(StructuredPruneConfig, {"recover": {"epochs": 1}}, "passes[0]")
    assert PASS_REGISTRY["prune"] is StructuredPrunePass


def test_ensures_catches_config_tensor_mismatch() -> None:
    model = tiny_llama()
    p = StructuredPrunePass(StructuredPruneConfig())
    ctx = _ctx(model, token_batches(1))
    p.ensures(PassOutput(model), ctx)
    model.config.intermediate_size = 100
    assert check_anatomy(describe_model(model))
    with pytest.raises(PassError, match="config says 100"):
        p.ensures(PassOutput(model), ctx)
