from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressor.errors import DataError, PlanError
from compressor.kernels.int8_linear import Int8Linear, fake_quant_dynamic_uint8, quantize_weight
from compressor.passes.quantize.quantize import QuantizePass, activation_absmax, quantize_config
from compressor.planning import PlanState
from compressor.targets import get_target
from tests.conftest import add_activation_outliers_
from tests.helpers.metrics import sqnr_db


def test_int8_linear_matches_the_integer_computation() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    x = torch.randn(3, 7, 40) * 3
    for scheme in ("dynamic_per_token", "dynamic_per_tensor"):
        q = Int8Linear.from_linear(lin, scheme)
        wq = q.qweight().to(torch.int64)
        assert wq.abs().max() <= 127 and q.qweight().dtype == torch.int8
        if scheme == "dynamic_per_token":
            sx = x.abs().amax(-1, keepdim=True) / 127
            xq = torch.clamp(torch.round(x / sx), -127, 127).to(torch.int64)
            zp = torch.zeros(())
        else:
            lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
            sx = torch.tensor((hi - lo) / 255)
            zp = torch.clamp(torch.round(-lo / sx), 0, 255)
            xq = (torch.clamp(torch.round(x / sx) + zp, 0, 255) - zp).to(torch.int64)
        acc = xq @ wq.T  # exact int64 accumulation
        expected = acc.double() * sx.double() * q.weight_scale.double() + lin.bias.double()
        torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-5)
        assert sqnr_db(lin(x), q(x)) > 30  # and it is still the same layer


def test_dynamic_uint8_emulates_onnx_dynamicquantizelinear() -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = (torch.randn(5, 33) * 2 + 0.7).float()
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "zp"])
    deq = helper.make_node("DequantizeLinear", ["y", "s", "zp"], ["out"])
    graph = helper.make_graph(
        [node, deq],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 33])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 33])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_out = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(fake_quant_dynamic_uint8(x).numpy(), ort_out, rtol=0, atol=1e-6)


def test_straight_through_gradient_reaches_master_weights() -> None:
    lin = nn.Linear(16, 8)
    q = Int8Linear.from_linear(lin, "dynamic_per_tensor")
    scale_before = q.weight_scale.clone()
    q(torch.randn(4, 16)).sum().backward()
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert not q.weight_scale.requires_grad and torch.equal(q.weight_scale, scale_before)


def test_quantize_pass_on_tiny_bert(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    cfg = quantize_config(
        targets=("encoder.*",), smoothquant=True, max_float_layers=2, target_mean_cosine=1.0
    )
    p = QuantizePass(cfg)
    p.plan(PlanState.from_model(model, ctx.target, adapter))
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    int8 = [n for n, m in out.model.named_modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 12 - 2  # 6 linears x 2 layers, the 2 most sensitive kept in float
    assert out.details["activation_scheme"] == "dynamic_per_tensor"  # cpu target -> ORT's scheme
    assert out.details["alpha"] in cfg.alpha_grid
    decisions = out.details["per_layer"]
    kept = [n for n, d in decisions.items() if d["precision"] == "fp32"]
    assert sorted(kept) == sorted(out.details["float_layers"])
    worst_quantized = max(d["sensitivity"] for d in decisions.values() if d["precision"] == "int8")
    assert all(decisions[n]["sensitivity"] >= worst_quantized for n in kept)
    m = adapter.metrics(out.model, ctx.teacher, ctx.data.eval)
    assert m["mean_cosine"] > 0.99, m
    assert m["weight_bytes"] < adapter.metrics(ctx.teacher, ctx.teacher, ctx.data.eval)["weight_bytes"]


def test_smoothquant_helps_when_activations_have_outliers(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    add_activation_outliers_(model)
    ctx.teacher = copy.deepcopy(model)
    scores = {}
    for sq in (False, True):
        # alpha fixed at the paper's 0.5: this tests the smoothing, not the (noisy on 16 texts) search
        cfg = quantize_config(targets=("encoder.*",), smoothquant=sq, alpha=0.5)
        out = QuantizePass(cfg).run(copy.deepcopy(model), ctx).model
        scores[sq] = adapter.metrics(out, ctx.teacher, ctx.data.eval)["mean_cosine"]
    assert 1 - scores[True] < 0.8 * (1 - scores[False]), scores


def test_plan_checks(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    with pytest.raises(PlanError, match="target pattern 'decoder.\\*' matches no Linear layer"):
        QuantizePass(quantize_config(targets=("decoder.*",))).plan(
            PlanState.from_model(model, ctx.target, adapter)
        )
    # per-token on the CPU: batch-invariant (ONNX Runtime runs it as QuantizeLinear + MatMulInteger)
    QuantizePass(quantize_config(activations="dynamic_per_token")).plan(
        PlanState.from_model(model, ctx.target, adapter)
    )
    QuantizePass(quantize_config(activations="dynamic_per_token")).plan(
        PlanState.from_model(model, get_target("a100"), adapter)
    )


def test_nan_in_calibration_is_named(tiny_ctx) -> None:
    adapter, model, ctx = tiny_ctx
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[0, 0] = float("nan")
    with pytest.raises(
        DataError, match="calibration activations entering encoder.layer.0.intermediate.dense contain NaN"
    ):
        activation_absmax(
            model, ["encoder.layer.0.intermediate.dense"], adapter.forward, ctx.data.calibration
        )


def test_quantize_weight_saturates() -> None:
    w = torch.tensor([[1.0, -1.0, 0.5, 3.0]])
    q = quantize_weight(w, torch.tensor([1.0 / 127]))
    assert q.tolist() == [[127, -127, 64, 127]]


@pytest.mark.parametrize("target", ["a100", "orin", "cpu"])
def test_fp8_plan_refused_before_any_work(tiny_ctx, target: str) -> None:
    adapter, model, ctx = tiny_ctx
    with pytest.raises(PlanError, match=f"quantize.method: fp8 is not supported on target '{target}'"):
        QuantizePass(quantize_config(method="fp8")).plan(
            PlanState.from_model(model, get_target(target), adapter)
        )


def test_fp8_on_h100_quantizes_to_e4m3(tiny_ctx) -> None:
    from compressor.kernels.fp8_linear import Fp8Linear

    adapter, model, ctx = tiny_ctx
    ctx.target = get_target("h100")
    p = QuantizePass(quantize_config(method="fp8", targets=("encoder.*",)))
    p.plan(PlanState.from_model(model, ctx.target, adapter))
    out = p.run(model, ctx)
    p.ensures(out, ctx)
    layers = [m for m in out.model.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 12
    for m in layers:
        w8 = m.fp8_weight()
        assert w8.dtype == torch.float8_e4m3fn and torch.isfinite(m.weight_scale).all()
        assert float(w8.float().abs().max()) <= 448.0
    m = adapter.metrics(out.model, ctx.teacher, ctx.data.eval)
    assert m["mean_cosine"] > 0.99, m


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_int4_compiles_to_matmulnbits_verified_in_onnx_runtime(tiny_bert_dir, tmp_path, algorithm) -> None:
    import onnx

    from compressor.app.compile import compile_recipe
    from compressor.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "name": "tiny-int4",
            "target": "cpu",
            "model": {"source": str(tiny_bert_dir)},
            "data": {"calibration_samples": 16, "train_samples": 0, "eval_samples": 16, "max_length": 32,
                     "batch_size": 8},
            "passes": [{"pass": "quantize", "method": "int4", "int4_algorithm": algorithm, "group_size": 32,
                        "targets": ["encoder.*"]}],
            "exports": [{"format": "onnx", "verify_batch_sizes": [1, 3], "verify_lengths": [9, 20]}],
            "evaluation": {"run_bench": False},
        },
        "int4.yaml",
    )  # fmt: skip
    manifest = compile_recipe(recipe, tmp_path / "b")
    record = manifest["passes"][1]
    assert record["details"]["quantized_layers"] == 12
    whys = [d["why"] for d in record["details"]["per_layer"].values()]
    if algorithm == "gptq":
        assert set(whys) == {"gptq"}
    else:  # post-LN BERT: no norm takes AWQ's scales, every layer divides its input
        assert all(w.startswith("awq (alpha") and w.endswith("input divisor)") for w in whys), whys
    assert record["metrics"]["mean_cosine"] > 0.95
    assert manifest["verification"]["onnx"]["min_cosine"] > 0.999
    graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 12
    assert (sum(n.op_type == "Div" for n in graph.node) >= 12) is (algorithm == "awq")


def test_int4_group_size_must_divide_every_layer(tiny_bert_dir) -> None:
    from compressor.app.compile import plan
    from compressor.errors import PlanError, RecipeError
    from compressor.recipe import parse_recipe

    base = {"target": "cpu", "model": {"source": str(tiny_bert_dir)}}
    with pytest.raises(
        PlanError, match="group_size: 128 does not divide encoder.layer.0.attention.self.query's 32"
    ):
        plan(
            parse_recipe(
                {**base, "passes": [{"pass": "quantize", "method": "int4"}], "exports": []}, "r.yaml"
            )
        )
    with pytest.raises(RecipeError, match="group_size: 48 is not one of 32, 64, 128"):
        parse_recipe({**base, "passes": [{"pass": "quantize", "method": "int4", "group_size": 48}]}, "r.yaml")


def _budget_recipe(tiny_bert_dir, **quantize):
    from compressor.recipe import parse_recipe

    return parse_recipe(
        {
            "name": "tiny-budget",
            "target": "cpu",
            "model": {"source": str(tiny_bert_dir)},
            "data": {"calibration_samples": 16, "train_samples": 0, "eval_samples": 16, "max_length": 32,
                     "batch_size": 8},
            "passes": [{"pass": "quantize", "method": "int8", "targets": ["encoder.*"], **quantize}],
            "exports": [],
            "evaluation": {"run_bench": False},
        },
        "budget.yaml",
    )  # fmt: skip


def _quantize_record(manifest) -> dict:
    return next(r for r in manifest["passes"] if r["pass"] == "quantize")


def test_fidelity_budget_keeps_the_most_sensitive_layers_in_float(tiny_ctx, tiny_bert_dir, tmp_path) -> None:
    from compressor.app.compile import compile_recipe

    adapter, model, ctx = tiny_ctx
    out = QuantizePass(quantize_config(targets=("encoder.*",))).run(copy.deepcopy(model), ctx)
    drop = 1.0 - out.details["calibration_mean_cosine"]  # every layer int8
    assert drop > 1e-5, drop  # lossy enough that a budget can bite
    budget = round(drop / 3, 9)  # a third of the all-int8 drop: some layers must stay float
    manifest = compile_recipe(
        _budget_recipe(tiny_bert_dir, fidelity_budget=budget, max_float_layers=12), tmp_path / "b"
    )
    d = _quantize_record(manifest)["details"]
    kept = d["float_layers"]
    assert 1 <= len(kept) < 12, kept
    assert d["calibration_mean_cosine"] >= 1.0 - budget - 1e-6
    assert d["mixed_precision"]["reached"] is True
    trace = d["mixed_precision"]["mean_cosine_by_float_layers"]
    assert len(trace) == len(kept) + 1 and trace[-1] >= 1.0 - budget > trace[-2]
    per_layer = d["per_layer"]
    assert sorted(n for n, x in per_layer.items() if x["precision"] == "fp32") == sorted(kept)
    assert sorted(per_layer[n]["rank"] for n in kept) == list(range(1, len(kept) + 1))  # the most sensitive
    for n, x in per_layer.items():
        if n in kept:
            assert x["why"].startswith("kept in fp32") and f"toward fidelity_budget {budget:g}" in x["why"]
        else:
            assert x["precision"] == "int8" and f"meets fidelity_budget {budget:g}" in x["why"], x


def test_fidelity_budget_is_a_drop_from_the_model_the_pass_receives(tiny_bert_dir, tmp_path) -> None:
    """After a prune has cost fidelity, the budget bounds what int8 adds, not the total: keeping
    layers in float cannot win back what pruning lost, so it must not be spent on it."""
    from compressor.app.compile import compile_recipe
    from compressor.recipe import parse_recipe

    budget = _budget_recipe(tiny_bert_dir, fidelity_budget=0.003, max_float_layers=4)
    recipe = parse_recipe(
        {**budget.to_dict(), "passes": [{"pass": "prune", "ffn": 0.25}, *budget.to_dict()["passes"]]},
        "r.yaml",
    )
    manifest = compile_recipe(recipe, tmp_path / "b")
    pruned = next(r for r in manifest["passes"] if r["pass"] == "prune")
    d = _quantize_record(manifest)["details"]
    goal = d["mixed_precision"]["target_mean_cosine"]
    before = goal + 0.003  # the pruned float model's calibration mean cosine
    assert before < 0.99, before  # pruning really lost fidelity: an absolute 0.997 would be out of reach
    assert "before this pass" in d["mixed_precision"]["target"]
    assert d["mixed_precision"]["reached"] is True
    assert d["calibration_mean_cosine"] >= goal - 1e-6
    trace = d["mixed_precision"]["mean_cosine_by_float_layers"]
    assert len(d["float_layers"]) == len(trace) - 1 < 4  # not every float layer spent for nothing
    assert pruned["metrics"]["mean_cosine"] < 0.99


def test_impossible_fidelity_budget_is_reported_as_missed(tiny_bert_dir, tmp_path, caplog) -> None:
    from compressor.app.compile import compile_recipe

    with caplog.at_level("WARNING", logger="compressor.passes.quantize.int8"):
        manifest = compile_recipe(
            _budget_recipe(tiny_bert_dir, fidelity_budget=1e-9, max_float_layers=2), tmp_path / "b"
        )
    d = _quantize_record(manifest)["details"]
    assert len(d["float_layers"]) == 2  # max_float_layers spent, the pass still finishes (as before)
    assert d["mixed_precision"]["reached"] is False
    assert d["calibration_mean_cosine"] < 1.0 - 1e-9
    missed = [x["why"] for x in d["per_layer"].values() if x["precision"] == "int8"]
    assert len(missed) == 10
    assert all(
        "max_float_layers (2) spent" in w and "still misses fidelity_budget 1e-09" in w for w in missed
    )
    assert "still misses fidelity_budget 1e-09" in caplog.text


def test_fidelity_budget_is_validated_with_its_key() -> None:
    from compressor.errors import RecipeError

    def parse(**kw):
        return QuantizePass.config_from_dict(kw, "r.yaml: passes[0]")

    assert parse(fidelity_budget=0.003, max_float_layers=4).fidelity_target().mean_cosine == pytest.approx(
        0.997
    )
    with pytest.raises(RecipeError, match=r"^r.yaml: passes\[0\].fidelity_budget: 1.5 is not in \[0, 1\)"):
        parse(fidelity_budget=1.5, max_float_layers=4)
    with pytest.raises(RecipeError, match=r"passes\[0\].fidelity_budget: -0.1 is not in \[0, 1\)"):
        parse(fidelity_budget=-0.1, max_float_layers=4)
    with pytest.raises(RecipeError, match=r"passes\[0\].fidelity_budget: expected a number, got 'tight'"):
        parse(fidelity_budget="tight", max_float_layers=4)
    with pytest.raises(
        RecipeError, match=r"passes\[0\].fidelity_budget: set either fidelity_budget or target_mean_cosine"
    ):
        parse(fidelity_budget=0.003, target_mean_cosine=0.997, max_float_layers=4)
    with pytest.raises(RecipeError, match=r"passes\[0\].fidelity_budget: needs max_float_layers > 0"):
        parse(fidelity_budget=0.003)
    with pytest.raises(RecipeError, match=r"passes\[0\].target_mean_cosine: needs max_float_layers > 0"):
        parse(target_mean_cosine=0.997)


@pytest.mark.parametrize("method", ["int8", "static"])
def test_a_decoders_calibration_batches_of_different_lengths(tiny_llama_dir, method: str) -> None:
    """A decoder's [B, T, V] logits of batches padded to different lengths are compared row by
    row (they were concatenated as they are, which failed on real text)."""
    from compressor.adapters.base import DataSplits
    from compressor.adapters.causal_lm import CausalLMAdapter
    from compressor.data import stdlib_docstring_splits
    from compressor.pipeline import PassContext
    from compressor.targets import get_target

    adapter = CausalLMAdapter()
    model = adapter.load(str(tiny_llama_dir))
    texts = list(stdlib_docstring_splits().calibration[:8])
    cal = [adapter.tokenize(texts[:4], 12, pad_to_max=True), adapter.tokenize(texts[4:], 20, pad_to_max=True)]
    assert cal[0]["input_ids"].shape[1] != cal[1]["input_ids"].shape[1]
    data = DataSplits(calibration=cal, train=cal, eval=cal)
    ctx = PassContext(target=get_target("cpu"), adapter=adapter, teacher=copy.deepcopy(model), data=data)
    activations = "static_per_tensor" if method == "static" else "dynamic_per_tensor"
    cfg = quantize_config(targets=("model.layers.*",), smoothquant=True, activations=activations)
    out = QuantizePass(cfg).run(model, ctx)
    assert out.details["quantized_layers"] == 14
    assert 0.9 < out.details["calibration_mean_cosine"] <= 1.0
