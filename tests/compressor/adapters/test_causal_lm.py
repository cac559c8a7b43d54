"""Decoder LMs (Llama / Qwen2): perplexity fidelity, SmoothQuant folded into RMSNorm, a full compile."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch

from compressor.adapters import make_adapter
from compressor.adapters.causal_lm import CausalLMAdapter, lm_fidelity
from compressor.app.compile import compile_recipe
from compressor.errors import RecipeError
from compressor.kernels.int8_linear import Int8Linear
from compressor.recipe import parse_recipe
from tests.helpers.tiny import LM_SPEC, save_tiny_lm


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_lm_dir(request, tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    return save_tiny_lm(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), minilm_path)


def test_perplexity_is_transformers_loss_and_self_fidelity_is_perfect(tiny_lm_dir: Path) -> None:
    adapter = make_adapter("auto", str(tiny_lm_dir))
    assert isinstance(adapter, CausalLMAdapter)
    model = adapter.load(str(tiny_lm_dir))
    data = adapter.make_data(LM_SPEC, seed=0)
    full = [b for b in data.eval if bool(b["attention_mask"].all())] or [
        {k: v[:1, : int(b["attention_mask"][0].sum())] for k, v in b.items()} for b in data.eval[:1]
    ]
    with torch.no_grad():
        ref_loss = model(input_ids=full[0]["input_ids"], labels=full[0]["input_ids"]).loss
        logits = adapter.forward(model, full[0])
    stats = lm_fidelity([(logits, logits, full[0])])
    assert stats["perplexity"] == pytest.approx(float(torch.exp(ref_loss)), rel=1e-4)
    assert stats["perplexity_ratio"] == pytest.approx(1.0)
    assert stats["kl_per_token"] == pytest.approx(0.0, abs=1e-9) and stats["top1_agreement"] == 1.0
    # a perturbed student: worse on every measure, and the measures agree on direction
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.model.layers[0].mlp.parameters():
            p.add_(torch.randn_like(p) * p.std())
    m = adapter.metrics(student, model, data.eval)
    assert m["kl_per_token"] > 1e-3 and m["top1_agreement"] < 1.0 and m["mean_cosine"] < 0.9999
    assert m["teacher_perplexity"] > 1.0 and m["params"] > 0


def test_smoothquant_folds_into_rmsnorm_and_the_lm_compiles_to_verified_onnx(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    tiny_lm_dir = tiny_llama_dir
    recipe = parse_recipe(
        {
            "name": "tiny-lm-int8",
            "target": "cpu",
            "model": {"source": str(tiny_lm_dir)},
            "data": {"calibration_samples": 16, "train_samples": 32, "eval_samples": 16, "max_length": 32,
                     "batch_size": 8},
            "passes": [
                {"pass": "quantize", "targets": ["model.layers.*"], "smoothquant": True, "alpha": 0.5},
                {"pass": "distill", "steps": 4, "lr": 1.0e-4, "warmup_steps": 1},
            ],
            "exports": [{"format": "onnx", "verify_batch_sizes": [1, 3], "verify_lengths": [7, 20]}],
            "evaluation": {"run_bench": False},
        },
        "lm.yaml",
    )  # fmt: skip
    manifest = compile_recipe(recipe, tmp_path / "bundle")
    assert manifest["model"]["adapter"] == "hf-causal-lm"
    q = manifest["passes"][1]["metrics"]  # after quantize (0 is the original model)
    # a random tiny LM's perplexity is near its vocabulary size, so the ratio moves little
    # either way; KL and top-1 agreement are the sharp measures
    assert abs(q["perplexity_ratio"] - 1.0) < 0.1 and q["kl_per_token"] < 0.05, q
    assert q["top1_agreement"] > 0.8, q
    assert manifest["verification"]["onnx"]["min_cosine"] > 0.999
    model = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits"]
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 2 * 7  # every projection
    # SmoothQuant folded into the pre-norms: q/k/v and gate/up carry no run-time divisor, and the
    # norm weights moved; o_proj / down_proj (no foldable producer) keep an explicit one or none
    adapter = CausalLMAdapter()
    student = adapter.load(str(tiny_lm_dir))
    from compressor.passes.quantize.quantize import QuantizePass, quantize_config
    from compressor.pipeline import PassContext
    from compressor.targets import get_target

    teacher = copy.deepcopy(student)
    ctx = PassContext(
        target=get_target("cpu"), adapter=adapter, teacher=teacher, data=adapter.make_data(LM_SPEC, 0)
    )
    out = QuantizePass(quantize_config(targets=("model.layers.*",), smoothquant=True, alpha=0.5)).run(
        student, ctx
    )
    layer = out.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and layer.self_attn.q_proj.smooth is None
    assert not torch.allclose(layer.input_layernorm.weight, teacher.model.layers[0].input_layernorm.weight)


def test_adapter_refuses_an_encoder_folder(tiny_bert_dir: Path) -> None:
    assert not isinstance(make_adapter("auto", str(tiny_bert_dir)), CausalLMAdapter)
    with pytest.raises(RecipeError, match="is not a causal language model"):
        CausalLMAdapter().load(str(tiny_bert_dir))
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    assert "BertModel" in config["architectures"]


def test_kl_output_loss_is_masked_tempered_kl() -> None:
    from compressor.distill.losses import output_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    temp = 2.0
    keep = mask.bool()
    p_t = torch.softmax(t[keep] / temp, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s[keep] / temp, -1))).sum(-1).mean() * temp**2
    assert float(output_loss("kl", s, t, temp, mask)) == pytest.approx(float(expected), rel=1e-5)
    s2 = s.clone()
    s2[1, 3] += 100.0  # a padded token: no effect
    assert float(output_loss("kl", s2, t, temp, mask)) == pytest.approx(float(expected), rel=1e-5)
    assert float(output_loss("kl", t, t, temp, mask)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_kl_distillation_recovers_a_damaged_lm(tiny_llama_dir: Path) -> None:
    from compressor.distill.config import DistillLossConfig, RecoverConfig
    from compressor.distill.loop import distill_

    adapter = CausalLMAdapter()
    teacher = adapter.load(str(tiny_llama_dir))
    data = adapter.make_data(LM_SPEC, seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers[1].mlp.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.5)
    before = adapter.metrics(student, teacher, data.eval)["kl_per_token"]
    loss = DistillLossConfig(output="kl", temperature=2.0, hidden_weight=0.0)
    distill_(
        student.train(),
        teacher,
        adapter,
        data.train,
        RecoverConfig(steps=30, lr=3e-3, warmup_steps=2, loss=loss),
    )
    after = adapter.metrics(student, teacher, data.eval)["kl_per_token"]
    assert after < 0.75 * before, (before, after)  # held-out KL; 32 training texts
