"""INT4 weight-only (RTN / GPTQ / AWQ) into Int4Linear, on a tiny Llama and real text."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.kernels.int4_linear import Int4Linear
from compressor.passes.quantize.weight_only import quantize_int4_
from tests.helpers.tiny import LM_SPEC, save_tiny_lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, minilm_path: str):
    path = save_tiny_lm("llama", tmp_path_factory.mktemp("int4-llama"), minilm_path)
    adapter = CausalLMAdapter()
    model = adapter.load(str(path))
    # trained LMs have outlier input channels; AWQ exists for them
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 20.0
            layer.post_attention_layernorm.weight[:4] = 20.0
    return adapter, model, adapter.make_data(LM_SPEC, seed=0)


@pytest.fixture(scope="module")
def kl_by_algorithm(lm) -> dict[str, float]:
    adapter, model, data = lm
    out = {}
    for key in ("rtn", "gptq", "awq", "awq_fold_only"):
        algorithm = key.removesuffix("_fold_only")
        student = copy.deepcopy(model)
        names = adapter.linear_names(student)
        decisions = quantize_int4_(
            student,
            names,
            algorithm,
            32,
            True,
            data.calibration,
            adapter.forward,
            adapter.smooth_groups(student),
            awq_explicit_scales=key == "awq",
        )
        assert all(isinstance(student.get_submodule(n), Int4Linear) for n in names)
        assert set(decisions) == set(names)
        if algorithm == "gptq":
            assert set(decisions.values()) == {"gptq"}
        n_layers = len(model.model.layers)
        if key == "awq_fold_only":  # q/k/v and gate/up fold into the RMSNorms; o/down: RTN + clipping
            assert sum(v.startswith("awq") for v in decisions.values()) == 5 * n_layers
            assert sum(v.startswith("rtn (clip") for v in decisions.values()) == 2 * n_layers
        if key == "awq":  # o/down (no norm before them) divide their input by their scales
            assert sum(v.startswith("awq") for v in decisions.values()) == 7 * n_layers
            divisors = [n for n, v in decisions.items() if v.endswith("input divisor)")]
            assert sorted(divisors) == sorted(n for n in names if n.endswith(("o_proj", "down_proj")))
            assert all(student.get_submodule(n).smooth is not None for n in divisors)
        out[key] = adapter.metrics(student, model, data.eval)["kl_per_token"]
    return out


def test_gptq_and_awq_beat_rtn_on_held_out_text(kl_by_algorithm: dict[str, float]) -> None:
    kl = kl_by_algorithm
    assert kl["rtn"] > 1e-4  # int4 is lossy enough to measure
    assert kl["gptq"] < 0.9 * kl["rtn"], kl
    assert kl["awq_fold_only"] < 0.7 * kl["rtn"], kl
    assert kl["awq"] < 0.6 * kl["rtn"], kl


def test_int4_keeps_a_24_mask_and_refuses_unknown_algorithms(lm) -> None:
    from compressor.passes.sparsity.sparsify import apply_mask_, mask_24_by_magnitude

    adapter, model, data = lm
    student = copy.deepcopy(model)
    name = "model.layers.0.mlp.up_proj"
    lin = student.get_submodule(name)
    with torch.no_grad():
        apply_mask_(lin, mask_24_by_magnitude(lin.weight))
    decisions = quantize_int4_(student, [name], "gptq", 32, True, data.calibration, adapter.forward)
    assert decisions[name] == "rtn (2:4 mask kept)"
    w = student.get_submodule(name).dequantized_weight()
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    with pytest.raises(ValueError, match="'int3' is not one of rtn, gptq, awq"):
        quantize_int4_(student, [], "int3", 32, True, data.calibration, adapter.forward)


def test_awq_beats_rtn_on_a_tiny_bert(tiny_ctx) -> None:
    """Post-LN BERT (every scale an input divisor), outlier channels as trained models have."""
    from tests.conftest import add_activation_outliers_

    adapter, model, ctx = tiny_ctx
    add_activation_outliers_(model)
    names = [n for n in adapter.linear_names(model) if n.startswith("encoder.")]
    loss = {}
    for algorithm, clip in (("rtn", False), ("awq", False), ("awq", True)):
        student = copy.deepcopy(model)
        decisions = quantize_int4_(
            student, names, algorithm, 32, True, ctx.data.calibration, adapter.forward,
            adapter.smooth_groups(student), awq_clip=clip,
        )  # fmt: skip
        if algorithm == "awq":
            assert all(v.startswith("awq (alpha") for v in decisions.values()), decisions
            assert all(("clip" in v) is clip for v in decisions.values()), decisions
        loss[f"{algorithm}{'+clip' if clip else ''}"] = (
            1 - adapter.metrics(student, model, ctx.data.eval)["mean_cosine"]
        )
    print(loss)
    assert loss["rtn"] > 1e-4  # lossy enough to measure
    assert loss["awq"] < 0.8 * loss["rtn"], loss
    assert loss["awq+clip"] < loss["awq"], loss
