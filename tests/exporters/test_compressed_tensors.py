"""compressed-tensors checkpoints (vLLM's format): our int8 codes travel, transformers reloads
them with the same fidelity, and plans the format cannot express are refused up front."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.app.compile import compile_recipe, plan
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext
from compressor.exporters.compressed_tensors import CompressedTensorsExporter
from compressor.kernels.fp8_linear import Fp8Linear
from compressor.kernels.int4_linear import Int4Linear
from compressor.kernels.int8_linear import Int8Linear
from compressor.passes.quantize.quantize import QuantizePass, quantize_config
from compressor.pipeline import PassContext
from compressor.recipe import parse_recipe
from compressor.targets import get_target
from tests.helpers.tiny import LM_SPEC

pytest.importorskip("compressed_tensors")


def _recipe(lm_dir: Path, target: str = "a100", **quantize: Any) -> Any:
    return parse_recipe(
        {
            "name": "tiny-lm-ct",
            "target": target,
            "model": {"source": str(lm_dir), "adapter": "hf-causal-lm"},
            "data": {"calibration_samples": 16, "train_samples": 32, "eval_samples": 16, "max_length": 32,
                     "batch_size": 8},
            "passes": [{"pass": "quantize", "targets": ["model.layers.*"], **quantize}],
            "exports": [{"format": "compressed_tensors"}],
            "evaluation": {"run_bench": False},
        },
        "ct.yaml",
    )  # fmt: skip


def _quantized(lm_dir: Path, target: str = "a100", **quantize: Any) -> tuple[nn.Module, ExportContext]:
    """The tiny LM run through the quantize pass and its export context."""
    adapter = CausalLMAdapter()
    model = adapter.load(str(lm_dir))
    ctx = PassContext(
        target=get_target(target),
        adapter=adapter,
        teacher=copy.deepcopy(model),
        data=adapter.make_data(LM_SPEC, 0),
    )
    q = QuantizePass(quantize_config(targets=("model.layers.*",), **quantize)).run(model, ctx).model
    return q, ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)


def test_w8a8_per_token_checkpoint_reloads_in_transformers(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = _recipe(
        tiny_qwen_dir, smoothquant=True, alpha=0.5, fold_only=True, activations="dynamic_per_token"
    )
    manifest = compile_recipe(recipe, tmp_path / "bundle")
    ver = manifest["verification"]["compressed_tensors"]
    assert ver["min_cosine"] > 0.99 and ver["quantized_layers"] == 2 * 7, ver
    assert ver["ignored_layers"] == ["lm_head"]
    folder = tmp_path / "bundle" / manifest["artifacts"]["compressed_tensors"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["quant_method"] == "compressed-tensors"
    (group,) = qc["config_groups"].values()
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"]
    tensors = load_file(str(folder / "model.safetensors"))
    w = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.int8 and int(w.abs().max()) == 127  # per-channel symmetric codes
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (w.shape[0], 1)
    assert "model.layers.0.self_attn.q_proj.bias" in tensors
    assert not any(k.endswith((".smooth", ".weight_mask", ".qweight_t")) for k in tensors)
    # the reloaded model is as faithful to the original as the compiled one measured
    adapter = CausalLMAdapter()
    teacher = adapter.load(str(tiny_qwen_dir))
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    data = adapter.make_data(LM_SPEC, seed=0)
    m = adapter.metrics(loaded, teacher, data.eval)
    assert m["top1_agreement"] > 0.8 and m["kl_per_token"] < 0.05, m


def test_static_scales_and_our_codes_travel(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    q, ectx = _quantized(tiny_llama_dir, activations="static_per_tensor", max_float_layers=1)
    res = CompressedTensorsExporter().export(q, ectx, tmp_path)
    assert res.verification["compressed_tensors"]["min_cosine"] > 0.99
    folder = tmp_path / "hf_compressed"
    assert not list(tmp_path.glob(".partial-*"))
    tensors = load_file(str(folder / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    floats = [
        n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, Int8Linear)
    ]
    assert sorted(qc["ignore"]) == sorted(floats) and len(floats) == 2  # lm_head + the kept float layer
    for name, m in q.named_modules():
        if isinstance(m, Int8Linear):
            assert torch.equal(tensors[f"{name}.weight"], m.qweight())  # OUR codes, not re-quantized
            assert float(tensors[f"{name}.input_scale"]) == pytest.approx(float(m.input_scale))
            # transformers keeps int8 weights or decompresses them: either way they are ours
            got = loaded.get_submodule(name)
            if got.weight.dtype == torch.int8:
                assert torch.equal(got.weight, m.qweight())
                torch.testing.assert_close(got.weight_scale.flatten(), m.weight_scale)
            else:
                deq = m.qweight().float() * m.weight_scale[:, None]
                torch.testing.assert_close(got.weight.detach(), deq, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "quantize", [{"activations": "dynamic_per_token"}, {"method": "int4", "group_size": 32}]
)
def test_24_sparsity_config_is_declared_on_request(tiny_llama_dir: Path, tmp_path: Path, quantize) -> None:
    """sparsity_config: true writes compressed-tensors' 2:4 entry (format dense: the zeros stay in
    the weights) for a model whose quantized weights are all 2:4, and the folder still reloads."""
    from compressor.exporters.compressed_tensors import CompressedTensorsExportConfig
    from compressor.passes.sparsity.sparsify import SparsifyConfig, SparsifyPass

    adapter = CausalLMAdapter()
    model = adapter.load(str(tiny_llama_dir))
    ctx = PassContext(target=get_target("a100"), adapter=adapter, teacher=copy.deepcopy(model),
                      data=adapter.make_data(LM_SPEC, 0))  # fmt: skip
    dense = (
        QuantizePass(quantize_config(targets=("model.layers.*",), **quantize))
        .run(copy.deepcopy(model), ctx)
        .model
    )
    SparsifyPass(SparsifyConfig(targets=("model.layers.*",))).run(model, ctx)  # in place
    q = QuantizePass(quantize_config(targets=("model.layers.*",), **quantize)).run(model, ctx).model
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=q)
    for sub in ("sparse", "default", "dense"):
        (tmp_path / sub).mkdir()
    exporter = CompressedTensorsExporter(CompressedTensorsExportConfig(sparsity_config=True))
    res = exporter.export(q, ectx, tmp_path / "sparse")
    ver = res.verification["compressed_tensors"]
    assert ver["sparsity_structure"] == "2:4" and ver["min_cosine"] > 0.99
    qc = json.loads((tmp_path / "sparse" / "hf_compressed" / "config.json").read_text())[
        "quantization_config"
    ]
    sc = qc["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "2:4" and sc["ignore"] == ["lm_head"]
    assert 0.5 <= sc["global_sparsity"] < 0.6  # half of every quantized weight, plus zero codes
    # off by default (later vLLM refuses Sparse24 checkpoints), and refused for a dense model
    default = CompressedTensorsExporter().export(q, ectx, tmp_path / "default")
    assert default.verification["compressed_tensors"]["sparsity_structure"] is None
    with pytest.raises(ExportError, match="sparsity_config: true, but not every quantized weight is 2:4"):
        exporter.export(dense, ectx, tmp_path / "dense")
    assert list((tmp_path / "dense").iterdir()) == []


def test_half_written_folder_never_remains(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    q, ectx = _quantized(tiny_llama_dir, activations="dynamic_per_token")
    import compressed_tensors.quantization.lifecycle.forward as ct_forward

    real = ct_forward.dequantize

    def wrong_dequantize(*args: Any, **kwargs: Any) -> torch.Tensor:
        return -real(*args, **kwargs)  # the loader reads our weights with the wrong sign

    monkeypatch.setattr(ct_forward, "dequantize", wrong_dequantize)
    for mod in list(sys.modules.values()):
        if getattr(mod, "dequantize", None) is real and getattr(mod, "__name__", "").startswith(
            "compressed_tensors"
        ):
            monkeypatch.setattr(mod, "dequantize", wrong_dequantize)
    with pytest.raises(ExportError, match="disagrees with torch: min cosine"):
        CompressedTensorsExporter().export(q, ectx, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_w4a16_codes_and_scales_travel(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from compressor.kernels.int4_format import unpack_w4a16

    q, ectx = _quantized(tiny_llama_dir, method="int4", group_size=32, int4_algorithm="gptq")
    res = CompressedTensorsExporter().export(q, ectx, tmp_path)
    ver = res.verification["compressed_tensors"]
    # weight-only: no activation rounding, so transformers' decompressed model computes what ours does
    assert ver["format"] == "pack-quantized" and ver["min_cosine"] > 0.9999, ver
    folder = tmp_path / "hf_compressed"
    (group,) = json.loads((folder / "config.json").read_text())["quantization_config"][
        "config_groups"
    ].values()
    assert group["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False
    }  # fmt: skip
    tensors = load_file(str(folder / "model.safetensors"))
    for name, m in q.named_modules():
        if isinstance(m, Int4Linear):
            codes = unpack_from_int32(
                tensors[f"{name}.weight_packed"], 4, torch.Size(m.dequantized_weight().shape)
            )
            assert torch.equal(codes.to(torch.int32) + 8, unpack_w4a16(m.packed).t())  # OUR codes
            torch.testing.assert_close(tensors[f"{name}.weight_scale"], m.scales.t(), rtol=0, atol=0)
    # an asymmetric int4 model is refused with what to change, and leaves nothing behind
    q2, ectx2 = _quantized(tiny_llama_dir, method="int4", group_size=32, symmetric=False)
    out = tmp_path / "asym"
    out.mkdir()
    with pytest.raises(ExportError, match="asymmetric int4.*set symmetric: true"):
        CompressedTensorsExporter().export(q2, ectx2, out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("target", "quantize", "message"),
    [
        (
            "a100",
            {"activations": "dynamic_per_tensor"},
            "activations dynamic_per_tensor; use dynamic_per_token",
        ),
        ("a100", {"smoothquant": True, "alpha": 0.5}, "set fold_only: true"),
        ("a100", {"method": "int4", "group_size": 32, "symmetric": False}, "asymmetric int4"),
    ],
)
def test_plans_the_format_cannot_express_are_refused(
    tiny_llama_dir: Path, target: str, quantize: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecipeError, match=message):
        plan(_recipe(tiny_llama_dir, target, **quantize))


@pytest.mark.parametrize(
    ("weights", "activations", "strategy", "dynamic"),
    [
        ("per_channel", "dynamic_per_token", "token", True),
        ("per_tensor", "static_per_tensor", "tensor", False),
    ],
)
def test_fp8_checkpoint_with_kv_cache_scales_reloads(
    tiny_llama_dir: Path, tmp_path: Path, weights: str, activations: str, strategy: str, dynamic: bool
) -> None:
    """FP8 (float-quantized) with an FP8 KV cache: OUR E4M3 codes and calibrated scales travel, the
    config says what vLLM reads, and the reloaded folder computes what the compiled model does."""
    q, ectx = _quantized(
        tiny_llama_dir, "h100", method="fp8", fp8_weights=weights, fp8_activations=activations, kv_cache="fp8"
    )
    res = CompressedTensorsExporter().export(q, ectx, tmp_path)
    ver = res.verification["compressed_tensors"]
    assert ver["min_cosine"] > 0.9999, ver  # the same rounding on both sides: max|x| / 448
    assert ver["kv_cache"]["layers"] == 2
    folder = tmp_path / "hf_compressed"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                     "dynamic": False}  # fmt: skip
    (group,) = qc["config_groups"].values()
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == weights.removeprefix(
        "per_"
    )
    assert (
        group["input_activations"]["strategy"] == strategy
        and group["input_activations"]["dynamic"] is dynamic
    )
    tensors = load_file(str(folder / "model.safetensors"))
    for name, m in q.named_modules():
        if isinstance(m, Fp8Linear):
            assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(tensors[f"{name}.weight"].float(), m.fp8_weight().float())  # OUR codes
            scale = tensors[f"{name}.weight_scale"]
            assert scale.shape == ((m.out_features, 1) if weights == "per_channel" else (1,))
            assert (f"{name}.input_scale" in tensors) is (activations == "static_per_tensor")
    for i in range(2):
        attn = q.get_submodule(f"model.layers.{i}.self_attn")
        for what in ("k_scale", "v_scale"):
            stored = tensors[f"model.layers.{i}.self_attn.{what}"]
            assert stored.shape == (1,) and float(stored) > 0
            assert torch.equal(stored, getattr(attn, what))


def test_fp8_kv_cache_scales_are_what_the_verification_applies(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A checkpoint whose K/V scales were wrecked after writing fails the reload check: the
    verification reads them from the file, it does not trust the model it was given."""
    from safetensors.torch import save_file

    from compressor.exporters.compressed_tensors import reload_kv_cache

    q, ectx = _quantized(tiny_llama_dir, "h100", method="fp8", kv_cache="fp8")
    CompressedTensorsExporter().export(q, ectx, tmp_path)
    folder = tmp_path / "hf_compressed"
    tensors = load_file(str(folder / "model.safetensors"))
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = tensors[f"model.layers.{i}.self_attn.k_scale"] * 64
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert reload_kv_cache(loaded, folder) is not None
    case = ectx.adapter.verification_cases(ectx.data.eval[0], (2,), (16,))[0]
    with torch.no_grad():
        ref, got = ectx.adapter.forward(q, case), ectx.adapter.forward(loaded, case)
    # keys 64x coarser: the logits move (a no-op emulation would leave them equal)
    assert float((ref - got).abs().max()) > 1e-3


def test_fp8_kv_cache_is_refused_off_h100_and_by_other_exports(tiny_llama_dir: Path) -> None:
    with pytest.raises(PlanError, match="quantize.kv_cache: fp8 is not supported on target 'a100'"):
        plan(_recipe(tiny_llama_dir, "a100", activations="dynamic_per_token", kv_cache="fp8"))
    recipe = parse_recipe(
        {
            "name": "kv-onnx", "target": "h100",
            "model": {"source": str(tiny_llama_dir), "adapter": "hf-causal-lm"},
            "passes": [{"pass": "quantize", "method": "int8", "targets": ["model.layers.*"], "kv_cache": "fp8"}],
            "exports": [{"format": "onnx"}],
        },
        "kv.yaml",
    )  # fmt: skip
    with pytest.raises(PlanError, match=r"onnx cannot write a fp8 KV cache .*compressed_tensors export"):
        plan(recipe)
