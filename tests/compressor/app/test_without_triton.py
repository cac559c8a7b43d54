"""Without Triton (the optional ``kernels`` extra) every module imports and every shipped recipe
kind compiles, on the pure-torch reference paths.

Each test runs its work in a subprocess where ``import triton`` fails: a ``sys.meta_path``
finder, installed before anything else imports, refuses ``triton`` and its submodules as on
a machine where it was never installed. The tiny models are built here, in the test process;
only the imports and the compiles run without Triton. Each compile must write a bundle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]

# The only modules that import triton (at module level): the Triton kernel files.
TRITON_KERNEL_FILES = frozenset(
    f"compressor.kernels.{name}"
    for name in ("scaled_gemm", "w8a8", "fp8_gemm", "w4a16", "sparse24", "arch_report")
)
PACKAGES = (
    "compressor",
    "compressor.passes",
    "compressor.kernels",
    "compressor.exporters",
    "compressor.adapters",
)

_NO_TRITON = """
import sys

class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTriton())
"""

_CHECK_NOT_LOADED = """
assert not [m for m in sys.modules if m == "triton" or m.startswith("triton.")], "triton got imported"
"""

# Shrinks a recipe dict to the tiny BERT and a few steps (used by the encoder compiles).
_SHRINK = """
def shrink(data, source):
    data["model"]["source"] = source
    data["data"] = {"calibration_samples": 16, "train_samples": 32, "eval_samples": 16, "max_length": 32,
                    "batch_size": 8}
    for p in data["passes"]:
        if "steps" in p:
            p.update(steps=2, warmup_steps=0)
        if p.get("recover"):
            p["recover"].update(steps=2, warmup_steps=0)
        if p["pass"] == "prune":  # the tiny BERT has 2 layers and FFN 64
            p.update(layers=1, ffn=32, ffn_multiple_of=16)
    for e in data.get("exports", []):
        e.pop("min_cosine", None)
        if e.get("format") in ("onnx", "onnx_qdq"):
            e.update(verify_batch_sizes=[2], verify_lengths=[16])
    data["evaluation"] = {"run_bench": False, "min_mean_cosine": None}
    return data
"""


def run_without_triton(code: str, helpers: str = "", timeout: float = 600) -> tuple[dict[str, Any], str]:
    """Run ``helpers`` then ``code`` in a fresh interpreter where ``import triton`` fails; ``code``
    prints one JSON line last, which is returned with the stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("TRITON_INTERPRET", None)
    src = _NO_TRITON + helpers + textwrap.dedent(code) + _CHECK_NOT_LOADED
    proc = subprocess.run(
        [sys.executable, "-c", src], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-8000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def assert_bundle(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in manifest["files"]:
        assert (out / rel).is_file(), rel
    return manifest


def test_kernels_import_nothing_from_passes() -> None:
    """The kernel boundary: formats and references live in kernels/, the passes import them."""
    offending = []
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offending += [
                f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("compressor.passes")
            ]
    assert offending == []


@pytest.mark.slow
def test_every_module_imports_and_only_the_kernel_files_need_triton() -> None:
    result, stderr = run_without_triton(
        f"""
        import importlib, json, pkgutil

        kernel_files = {sorted(TRITON_KERNEL_FILES)!r}
        imported, refused = [], {{}}
        for pkg_name in {PACKAGES!r}:
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
                if info.name in kernel_files:
                    try:
                        importlib.import_module(info.name)
                    except ImportError as e:
                        refused[info.name] = f"{{type(e).__name__}}: {{e}} (name={{e.name}})"
                    else:
                        refused[info.name] = "imported"
                else:
                    importlib.import_module(info.name)
                    imported.append(info.name)

        from compressor.app.cli import main
        from compressor.kernels.triton_support import HAS_TRITON

        rc = main(["kernels", "--arch", "sm_80"])
        print(json.dumps({{"imported": imported, "refused": refused, "has_triton": HAS_TRITON, "rc": rc}}))
        """
    )
    assert result["has_triton"] is False
    assert set(result["refused"]) == TRITON_KERNEL_FILES, result["refused"]
    for name, why in result["refused"].items():
        assert why.startswith("ModuleNotFoundError") and "name=triton" in why, (name, why)
    for name in (
        "compressor.kernels.int4_format",
        "compressor.kernels.fp8_format",
        "compressor.kernels.sparse24_format",
        "compressor.kernels.reference",
        "compressor.kernels.int4_linear",
        "compressor.kernels.int8_linear",
        "compressor.kernels.fp8_linear",
        "compressor.kernels.sparse24_linear",
        "compressor.passes.quantize.quantize",
        "compressor.passes.quantize.weight_only",
        "compressor.exporters.compressed_tensors",
        "compressor.app.cli",
    ):
        assert name in result["imported"], name
    # `compressor kernels` needs Triton: one line naming the extra, exit status 2
    assert result["rc"] == 2
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert "triton" in line and 'pip install -e ".[kernels]"' in line, line


@pytest.mark.slow
def test_encoder_recipes_compile_without_triton(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Every shipped text-encoder recipe (MiniLM: int8 + distill, prune, SparseGPT 2:4, the GPU
    Q/DQ one), int4 (GPTQ, MatMulNBits ONNX) and fp8 on h100, each shrunk to the tiny BERT."""
    result, _ = run_without_triton(
        f"""
        import json
        from pathlib import Path

        from compressor.app.compile import compile_recipe
        from compressor.kernels.fp8_linear import Fp8Linear
        from compressor.recipe import load_recipe, parse_recipe, shipped_recipes

        src, tmp = {str(tiny_bert_dir)!r}, Path({str(tmp_path)!r})
        recipes = {{}}
        for name in sorted(shipped_recipes()):
            data = load_recipe(name).to_dict()
            if data["model"].get("adapter", "auto") in ("auto", "hf-encoder"):
                recipes[name] = shrink(data, src)
        base = {{"model": {{"source": src}}, "passes": [], "exports": []}}
        recipes["int4"] = shrink({{
            **base, "name": "tiny-int4", "target": "cpu",
            "passes": [{{"pass": "quantize", "method": "int4", "int4_algorithm": "gptq", "group_size": 32,
                         "targets": ["encoder.*"]}}],
            "exports": [{{"format": "onnx"}}],
        }}, src)
        recipes["fp8"] = shrink({{
            **base, "name": "tiny-fp8", "target": "h100",
            "passes": [{{"pass": "quantize", "method": "fp8", "targets": ["encoder.*"]}}],
        }}, src)
        out = {{}}
        for name, data in recipes.items():
            manifest = compile_recipe(parse_recipe(data, name + ".yaml"), tmp / name)
            out[name] = [p["pass"] for p in manifest["passes"]]
        print(json.dumps(out))
        """,
        helpers=_SHRINK,
    )
    assert {"minilm-cpu-int8", "minilm-cpu-pruned-int8", "minilm-24-int8", "int4", "fp8"} <= set(result)
    for name in result:
        manifest = assert_bundle(tmp_path / name)
        if name != "fp8":
            assert any(k.startswith("onnx") for k in manifest["verification"]), name
            for check in manifest["verification"].values():
                if "min_cosine" in check:
                    assert check["min_cosine"] > 0.99, (name, check)
    assert result["minilm-24-int8"][1:] == ["sparsify", "quantize", "distill"]
    assert result["minilm-cpu-pruned-int8"][1] == "prune"


@pytest.mark.slow
def test_causal_lm_compressed_tensors_compiles_without_triton(tmp_path: Path, minilm_path: str) -> None:
    """A tiny Llama to a compressed-tensors checkpoint, W8A8 and W4A16 (the int4 export unpacks
    the W4A16 codes, which used to import the Triton kernel file)."""
    pytest.importorskip("compressed_tensors")
    from tests.helpers.tiny import save_tiny_lm

    lm = save_tiny_lm("llama", tmp_path / "tiny-llama", minilm_path)
    result, _ = run_without_triton(
        f"""
        import json
        from pathlib import Path

        from compressor.app.compile import compile_recipe
        from compressor.recipe import parse_recipe

        tmp = Path({str(tmp_path)!r})
        out = {{}}
        for name, quantize in (("w8a8", {{}}), ("w4a16", {{"method": "int4", "group_size": 32}})):
            data = {{
                "name": "tiny-lm-" + name, "target": "a100",
                "model": {{"source": {str(lm)!r}, "adapter": "hf-causal-lm"}},
                "data": {{"calibration_samples": 16, "train_samples": 32, "eval_samples": 16, "max_length": 32,
                          "batch_size": 8}},
                "passes": [{{"pass": "quantize", "targets": ["model.layers.*"], **quantize}}],
                "exports": [{{"format": "compressed_tensors"}}],
                "evaluation": {{"run_bench": False}},
            }}
            manifest = compile_recipe(parse_recipe(data, name + ".yaml"), tmp / name)
            out[name] = manifest["verification"]["compressed_tensors"]["format"]
        print(json.dumps(out))
        """
    )
    assert result == {"w8a8": "int-quantized", "w4a16": "pack-quantized"}
    for name in result:
        assert_bundle(tmp_path / name)
        assert (tmp_path / name / "hf_compressed" / "model.safetensors").is_file()


@pytest.mark.slow
def test_digits_step_reduction_compiles_without_triton(tmp_path: Path) -> None:
    """The shipped digits-steps-consistency recipe on a tiny class-conditional UNet, two steps a pass."""
    pytest.importorskip("diffusers")
    pytest.importorskip("sklearn")
    from diffusers import DDPMPipeline, DDPMScheduler

    from tests.helpers.diffusion import tiny_teacher

    teacher = tiny_teacher()
    unet = teacher.unet  # a plain diffusers folder: the label embedding back inside the UNet
    unet.class_embedding = teacher.conditioner.label_embedding
    unet.register_to_config(class_embed_type=None, num_class_embeds=11)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(teacher.train_config)).save_pretrained(
        tmp_path / "t"
    )
    (tmp_path / "t" / "sampling.json").write_text('{"steps": 4, "guidance_scale": 2.0}')
    result, _ = run_without_triton(
        f"""
        import json
        from pathlib import Path

        import torch

        from compressor.app.compile import compile_recipe
        from compressor.recipe import load_recipe, parse_recipe

        torch.set_num_threads(1)
        tmp = Path({str(tmp_path)!r})
        data = load_recipe("digits-steps-consistency").to_dict()
        data["model"]["source"] = str(tmp / "t")
        data["data"].update(eval_samples=20, calibration_samples=32)
        data["passes"][0]["train_steps"] = 2
        data["passes"][1].update(train_steps=2, sampling_steps=2)
        manifest = compile_recipe(parse_recipe(data, "digits.yaml"), tmp / "bundle")
        print(json.dumps([p["metrics"]["nfe"] for p in manifest["passes"]]))
        """
    )
    assert result == [8.0, 4.0, 2.0, 2.0]  # teacher CFG, guidance-distilled, consistency, + int8
    assert_bundle(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "pipeline").is_dir()
