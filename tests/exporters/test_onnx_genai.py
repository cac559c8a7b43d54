"""The `onnx_genai` export: a decoder LM with its KV cache that ONNX Runtime GenAI loads and
generates from, token for token what transformers generates; quantized graphs agree with our
torch emulation of themselves; what GenAI cannot run is refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from compressor.adapters.causal_lm import CausalLMAdapter
from compressor.adapters.lm_cache import CacheGeometry
from compressor.app.compile import compile_recipe, plan
from compressor.errors import ExportError, PlanError, RecipeError
from compressor.exporters.base import ExportContext
from compressor.exporters.onnx.genai_verify import torch_greedy, verify_genai_folder
from compressor.exporters.onnx.onnx_genai import OnnxGenaiExportConfig, OnnxGenaiExporter
from compressor.passes.quantize.quantize import QuantizePass, quantize_config
from compressor.pipeline import PassContext
from compressor.planning import PlanState
from compressor.recipe import parse_recipe
from compressor.targets import get_target
from tests.helpers.tiny import LM_SPEC

og = pytest.importorskip("onnxruntime_genai")


def _exported(lm_dir: Path, out: Path, **quantize: Any) -> tuple[nn.Module, ExportContext, dict[str, Any]]:
    adapter = CausalLMAdapter()
    model = adapter.load(str(lm_dir))
    ctx = PassContext(target=get_target("cpu"), adapter=adapter, teacher=copy.deepcopy(model),
                      data=adapter.make_data(LM_SPEC, 0))  # fmt: skip
    if quantize:
        model = QuantizePass(quantize_config(targets=("model.layers.*",), **quantize)).run(model, ctx).model
    ectx = ExportContext(target=ctx.target, adapter=adapter, data=ctx.data, reference_model=model)
    res = OnnxGenaiExporter().export(model, ectx, out)
    assert res.artifacts == {"onnx_genai": "genai"}
    return model, ectx, res.verification["onnx_genai"]


def test_genai_generates_what_transformers_generates(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, ectx, ver = _exported(tiny_llama_dir, tmp_path)
    folder = tmp_path / "genai"
    assert sorted(p.name for p in folder.iterdir()) >= ["genai_config.json", "model.onnx"]
    assert not list(tmp_path.glob(".partial-*"))
    assert ver["generation"]["identical_prompts"] == 3 and ver["generation"]["required_identical"]
    assert ver["cached_steps"]["min_cosine"] > 0.9999
    gc = json.loads((folder / "genai_config.json").read_text())
    assert gc["model"]["type"] == "llama" and gc["model"]["decoder"]["num_key_value_heads"] == 2
    # GenAI on its own, outside our verification: a prompt it never saw, 64 greedy tokens
    prompt = [101, 2023, 2003, 1037, 3231, 1997]
    og_model = og.Model(str(folder))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + 64, min_length=len(prompt) + 64, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    got = [int(t) for t in gen.get_sequence(0)][len(prompt) :]
    assert len(got) == 64 and got == torch_greedy(model, prompt, 64)


@pytest.mark.parametrize(
    ("quantize", "op"),
    [
        ({"method": "int8", "activations": "dynamic_per_tensor"}, "MatMulInteger"),
        ({"method": "int4", "group_size": 32, "int4_algorithm": "rtn"}, "MatMulNBits"),
        (
            {"method": "int4", "group_size": 32, "int4_algorithm": "rtn", "int4_activations": "int8"},
            "MatMulNBits",
        ),
    ],
)
def test_quantized_graphs_agree_with_their_torch_emulation(
    tiny_qwen_dir: Path, tmp_path: Path, quantize: dict[str, Any], op: str
) -> None:
    import onnx

    _, _, ver = _exported(tiny_qwen_dir, tmp_path, **quantize)
    nodes = onnx.load(str(tmp_path / "genai" / "model.onnx")).graph.node
    assert op in {n.op_type for n in nodes}
    levels = {
        a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"
    }
    # int8 activations: ORT's int8 dot products, which our torch path rounds alike (checked below)
    assert levels == ({4} if quantize.get("int4_activations") == "int8" else set())
    # stepped token by token through the cache on both sides: ORT's int8 / int4 math is ours
    assert ver["cached_steps"]["min_cosine"] > 0.9999, ver
    assert not ver["generation"]["required_identical"]  # reported, not required, by default
    assert ver["generation"]["identical_prompts"] >= 2, ver


def test_a_graph_that_is_not_the_model_fails_verification(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, ectx, _ = _exported(tiny_llama_dir, tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
    geometry = CacheGeometry.of(model.config)
    with pytest.raises(ExportError, match="cached graph's logits disagree with torch"):
        verify_genai_folder(tmp_path / "genai", other, ectx, geometry, OnnxGenaiExportConfig())


def test_compile_recipe_writes_and_records_the_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "name": "tiny-genai", "target": "cpu",
            "model": {"source": str(tiny_llama_dir), "adapter": "hf-causal-lm"},
            "data": {"calibration_samples": 16, "train_samples": 32, "eval_samples": 16, "max_length": 32,
                     "batch_size": 8},
            "passes": [{"pass": "quantize", "method": "int4", "group_size": 32, "int4_algorithm": "rtn",
                        "targets": ["model.layers.*"]}],
            "exports": [{"format": "onnx_genai", "verify_prompts": 2, "verify_new_tokens": 16}],
            "evaluation": {"run_bench": False},
        },
        "genai.yaml",
    )  # fmt: skip
    manifest = compile_recipe(recipe, tmp_path / "bundle")
    assert manifest["artifacts"]["onnx_genai"] == "genai"
    assert manifest["verification"]["onnx_genai"]["generation"]["prompts"] == 2
    assert (tmp_path / "bundle" / "genai" / "genai_config.json").is_file()


def _recipe(source: Path, target: str, passes: list[dict[str, Any]], adapter: str = "hf-causal-lm") -> Any:
    return parse_recipe(
        {"name": "r", "target": target, "model": {"source": str(source), "adapter": adapter}, "passes": passes,
         "exports": [{"format": "onnx_genai"}]},
        "r.yaml",
    )  # fmt: skip


def test_what_genai_cannot_run_is_refused(tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="onnx_genai cannot take fp8 layers"):
        plan(
            _recipe(
                tiny_llama_dir, "h100", [{"pass": "quantize", "method": "fp8", "targets": ["model.layers.*"]}]
            )
        )
    with pytest.raises(RecipeError, match="writes decoder language models; model.adapter is hf-encoder"):
        plan(_recipe(tiny_bert_dir, "cpu", [], adapter="hf-encoder"))
    adapter = CausalLMAdapter()
    model = adapter.load(str(tiny_llama_dir))
    model.config.model_type = "cohere"  # a decoder type GenAI's standard decoder does not take
    state = PlanState.from_model(model, get_target("cpu"), adapter).replace(where="exports[0] (onnx_genai)")
    with pytest.raises(RecipeError, match="model type 'cohere' is not one ONNX Runtime GenAI's decoder runs"):
        OnnxGenaiExporter().check_plan(state)


def test_int8_activations_of_int4_are_a_cpu_path(tiny_llama_dir: Path) -> None:
    with pytest.raises(PlanError, match="int4_activations: int8 is ONNX Runtime's CPU int4 path"):
        plan(_recipe(tiny_llama_dir, "a100", [{"pass": "quantize", "method": "int4", "group_size": 32,
                                                "int4_activations": "int8", "targets": ["model.layers.*"]}]))  # fmt: skip
