"""`compressor bench` on a decoder LM bundle: prefill and decode per token in ONNX Runtime GenAI
against the float model with its KV cache, and a GenAI config that would load code refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.app.bench_lm import check_genai_folder
from compressor.app.compile import compile_recipe
from compressor.errors import CompressorError
from compressor.recipe import parse_recipe
from compressor.trust import Signature, Trust

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def lm_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    out = tmp_path_factory.mktemp("lm") / "bundle"
    compile_recipe(recipe, out)
    return out


def test_bench_times_prefill_and_decode_side_by_side(lm_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "compressor.app.cli", "bench", str(lm_bundle), "--seq-len", "24",
           "--repeats", "3", "--warmup", "1", "--decode-tokens", "8", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "bench.json").read_text())
    assert [r["phase"] for r in result["latency"]] == ["prefill", "decode per token"]
    prefill, decode = result["latency"]
    assert prefill["seq_len"] == 24 and decode["seq_len"] == 1
    for row, runs in ((prefill, 3), (decode, 3 * 7)):  # 7 timed tokens a turn: the first is not
        assert set(row["engines"]) == {"ort_fp32", "genai"}
        for s in row["engines"].values():
            assert s["repeats"] == runs and s["median_ms"] > 0
        assert row["engines"]["ort_fp32"]["speedup_vs_ort_fp32"] == 1.0
    g = result["engines"]["genai"]["greedy_vs_baseline"]
    assert g["new_tokens"] == 8
    md = (out / "bench.md").read_text()
    assert "decode per token 1 x 1" in md and "Greedy tokens vs the baseline" in md


def _copy_with(bundle: Path, tmp: Path, **decoder: object) -> Path:
    folder = tmp / "genai"
    shutil.copytree(bundle / "genai", folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"].update(decoder)
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def test_a_genai_config_that_loads_code_is_refused_unless_trusted(lm_bundle: Path, tmp_path: Path) -> None:
    untrusted = Trust(False, "not signed", Signature("none", "no signature"))
    trusted = Trust(True, "signed here", Signature("own", "signed"))
    check_genai_folder(lm_bundle / "genai", untrusted)  # as compiled: plain data
    odd = _copy_with(lm_bundle, tmp_path / "a", session_options={"custom_ops_library": "evil.so"})
    with pytest.raises(CompressorError, match="sets custom_ops_library, which can load code"):
        check_genai_folder(odd, untrusted)
    check_genai_folder(odd, trusted)
    outside = _copy_with(lm_bundle, tmp_path / "b", filename="../model.onnx")
    with pytest.raises(CompressorError, match="is not a file inside the folder"):
        check_genai_folder(outside, trusted)


def test_a_decoder_bundle_without_the_genai_folder_is_told_what_to_add(tmp_path: Path) -> None:
    from compressor.app.bench import BenchConfig
    from compressor.app.bench_lm import bench_lm_bundle

    untrusted = Trust(False, "not signed", Signature("none", "no signature"))
    with pytest.raises(CompressorError, match="without an onnx_genai folder; add `- format: onnx_genai`"):
        bench_lm_bundle(tmp_path, {"artifacts": {"onnx": "model.onnx"}}, None, None, BenchConfig(), untrusted)
