"""The bundle from your own code: ``compressor.runtime.load`` and the tokenizer a compile bundles.

fp32 bundles (``passes: []``) of the tiny BERT, the tiny Llama and (for the README's snippet) the
packaged all-MiniLM-L6-v2 are compiled for real and checked against the original model in
transformers; the refusals are checked on copies of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compressor.bundle import check_bundle
from compressor.errors import CompressorError
from compressor.manifest import sha256_file
from compressor.runtime import BundleLoadError, CausalLM, SentenceEncoder, load

ROOT = Path(__file__).resolve().parents[2]
LONG = " ".join(["A much longer sentence pads the short one in the batch, many times over."] * 30)
TEXTS = ["a compressed sentence encoder", "Hello, world!", "Numbers 3.14 and café naïve."]


def _compile(source: Path | str, out: Path, exports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An fp32 bundle of ``source`` at ``out``: no pass, an ONNX export checked on one shape."""
    from compressor.app.compile import compile_recipe
    from compressor.recipe import parse_recipe

    if exports is None:
        exports = [{"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [16]}]
    recipe = parse_recipe(
        {
            "name": "fp32",
            "target": "cpu",
            "model": {"source": str(source)},
            "data": {"calibration_samples": 8, "train_samples": 0, "eval_samples": 8, "max_length": 16},
            "passes": [],
            "exports": exports,
            "evaluation": {"run_bench": False},
        },
        "fp32.yaml",
    )
    return compile_recipe(recipe, out)


def _reference_embeddings(folder: Path | str, texts: list[str], max_length: int) -> np.ndarray:
    """The original model in transformers: AutoModel, mean pooling over the mask, L2."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def bert_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("rt-bert") / "bundle"
    return out, _compile(tiny_bert_dir, out)


@pytest.fixture()
def bert_copy(bert_bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A copy of the tiny BERT bundle to break."""
    return Path(shutil.copytree(bert_bundle[0], tmp_path / "copy"))


def test_the_tokenizer_files_are_bundled_and_hashed(
    bert_bundle: tuple[Path, dict[str, Any]], tiny_bert_dir: Path
) -> None:
    out, manifest = bert_bundle
    names = sorted(p.name for p in (out / "tokenizer").iterdir())
    # the folder's tokenizer files, by the allow-list: not its config.json or weights
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert manifest["artifacts"]["tokenizer"] == "tokenizer"
    section = manifest["runtime"]
    assert section["kind"] == "sentence-embedding" and section["pooling"] == {
        "method": "mean",
        "normalize": "l2",
    }
    tok = section["tokenizer"]
    assert tok["tokenizer_json"] == "copied from the model folder"
    for name in names:
        rel = f"tokenizer/{name}"
        sha = sha256_file(out / rel)
        assert manifest["files"][rel]["sha256"] == sha == tok["files"][rel]
        assert (out / rel).read_bytes() == (tiny_bert_dir / name).read_bytes()
    # no sentence_bert_config.json: min(tokenizer model_max_length 512, max_position_embeddings 128)
    assert tok["settings"]["max_length"] == 128 and tok["max_length_from"] == "max_position_embeddings"
    assert tok["settings"]["pad_id"] == 0 and tok["settings"]["pad_token"] == "[PAD]"
    assert section["onnx"] == {"artifact": "onnx", "file": "model.onnx", "external_data": []}
    check_bundle(out)  # the bundle's own check passes on it


def test_encoder_matches_the_original_and_ignores_its_batch(
    bert_bundle: tuple[Path, dict[str, Any]], tiny_bert_dir: Path
) -> None:
    model = load(bert_bundle[0], threads=1)
    assert isinstance(model, SentenceEncoder) and model.pooled_in_graph and model.max_length == 128
    emb = model(TEXTS)
    assert emb.dtype == np.float32 and emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)  # pooled in the graph, once
    ref = _reference_embeddings(tiny_bert_dir, TEXTS, 128)
    assert _cosines(emb, ref).min() > 0.9999
    # a text's embedding does not depend on what it is batched with: padded to a long neighbour
    alone = model([TEXTS[0]])
    padded = model([TEXTS[0], LONG])
    assert np.abs(padded[0] - alone[0]).max() < 1e-5
    # the long text is truncated to the serving length, as transformers truncates it
    assert len(model.tokenizer.encode(LONG).ids) == 128
    assert _cosines(padded[1:], _reference_embeddings(tiny_bert_dir, [LONG], 128)).min() > 0.9999
    # internal batching gives the rows a single batch gives
    np.testing.assert_allclose(model([*TEXTS, LONG], batch_size=2)[:3], emb, atol=1e-5)
    assert model([]).shape == (0, 32)
    with pytest.raises(TypeError, match="list of strings"):
        model("one string")


def test_runtime_needs_neither_torch_nor_transformers(bert_bundle: tuple[Path, dict[str, Any]]) -> None:
    code = (
        "import sys, json\n"
        "for m in ('torch', 'transformers', 'onnx', 'safetensors'):\n"
        "    sys.modules[m] = None  # importing any of them now raises\n"
        "from compressor.runtime import load\n"
        f"print(json.dumps(load({str(bert_bundle[0])!r})({TEXTS!r}).tolist()))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    emb = np.array(json.loads(done.stdout))
    np.testing.assert_allclose(emb, load(bert_bundle[0])(TEXTS), atol=1e-6)


def test_a_changed_tokenizer_is_refused(bert_copy: Path) -> None:
    path = bert_copy / "tokenizer" / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"[UNK]"', '"[UNQ]"'), encoding="utf-8")  # still a valid tokenizer
    with pytest.raises(BundleLoadError, match=r"tokenizer/tokenizer\.json does not match its sha256") as e:
        load(bert_copy)
    assert "\n" not in str(e.value) and str(bert_copy) in str(e.value)
    with pytest.raises(CompressorError, match="tokenizer/tokenizer.json does not match its sha256"):
        check_bundle(bert_copy)  # `compressor verify` / bench refuse it too


def test_a_file_added_to_the_tokenizer_is_refused_by_the_bundle_check(bert_copy: Path) -> None:
    (bert_copy / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(CompressorError, match="not listed in files"):
        check_bundle(bert_copy)


def test_a_changed_onnx_is_refused(bert_copy: Path) -> None:
    data = bytearray((bert_copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (bert_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleLoadError, match=r"model\.onnx does not match its sha256"):
        load(bert_copy)


def test_onnx_external_data_is_hashed_before_onnx_runtime_reads_it(bert_copy: Path) -> None:
    """A model whose weights sit in an external-data file (as > 2 GB exports do) is loaded by
    path, after the file the manifest's ``runtime.onnx.external_data`` names is checked."""
    import onnx

    from compressor.bundle import onnx_external_files

    expected = load(bert_copy)(TEXTS)
    proto = onnx.load(str(bert_copy / "model.onnx"))
    onnx.save(
        proto,
        str(bert_copy / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert onnx_external_files(bert_copy / "model.onnx") == ["weights.bin"] * len(proto.graph.initializer)

    def relist(m: dict[str, Any], external: list[str]) -> None:  # as a compile writing it would
        for rel in ("model.onnx", "weights.bin"):
            m["files"][rel] = {
                "sha256": sha256_file(bert_copy / rel),
                "bytes": (bert_copy / rel).stat().st_size,
            }
        m["runtime"]["onnx"]["external_data"] = external

    _edit_manifest(bert_copy, lambda m: relist(m, []))
    with pytest.raises(BundleLoadError, match="ONNX Runtime cannot load model.onnx"):
        load(bert_copy)  # from the hashed bytes, where no external file can be read
    _edit_manifest(bert_copy, lambda m: relist(m, ["weights.bin"]))
    np.testing.assert_allclose(load(bert_copy)(TEXTS), expected, atol=1e-6)
    data = bytearray((bert_copy / "weights.bin").read_bytes())
    data[0] ^= 0xFF
    (bert_copy / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BundleLoadError, match=r"weights\.bin does not match its sha256"):
        load(bert_copy)


def _edit_manifest(bundle: Path, edit: Any) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (lambda b: (b / "manifest.json").unlink(), "not a bundle"),
        (
            lambda b: shutil.rmtree(b / "tokenizer"),
            "tokenizer/tokenizer.json is named in the manifest but missing",
        ),
        (lambda b: _edit_manifest(b, lambda m: m.pop("runtime")), "has no tokenizer"),
        (lambda b: _edit_manifest(b, lambda m: m["runtime"].update(tokenizer=None)), "has no tokenizer"),
        (
            lambda b: _edit_manifest(b, lambda m: m["files"].pop("tokenizer/tokenizer.json")),
            "not listed in files",
        ),
        (
            lambda b: _edit_manifest(b, lambda m: m["runtime"]["tokenizer"].update(folder="../elsewhere")),
            "leads out of the bundle",
        ),
        (lambda b: _edit_manifest(b, lambda m: m["runtime"].update(onnx=None)), "has no ONNX model"),
        (
            lambda b: _edit_manifest(b, lambda m: m.update(runtime=None, model={"adapter": "diffusers"})),
            "not a text-model bundle",
        ),
    ],
)
def test_bundles_the_runtime_cannot_serve_are_refused_in_one_line(
    bert_copy: Path, breaks: Any, message: str
) -> None:
    breaks(bert_copy)
    with pytest.raises(BundleLoadError, match=re.escape(message)) as e:
        load(bert_copy)
    assert "\n" not in str(e.value)


def test_a_path_that_is_no_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleLoadError, match="not a folder"):
        load(tmp_path / "missing")


def test_a_model_folder_without_tokenizer_is_refused_at_compile(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from compressor.app.cli import main

    folder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "model"))
    for p in folder.iterdir():
        if p.name not in ("config.json", "model.safetensors"):
            p.unlink()
    out = tmp_path / "out" / "bundle"
    assert main(["compile", "--model", str(folder), "--out", str(out), "--no-bench"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder) in errors[0] and "no tokenizer" in errors[0], errors
    assert "copy the tokenizer files" in errors[0]
    assert not out.exists() and not (tmp_path / "out").exists()  # nothing left behind, not even the parent


def test_a_folder_of_slow_tokenizer_files_gets_a_tokenizer_json(
    tiny_bert_dir: Path, bert_bundle: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "model"))
    (folder / "tokenizer.json").unlink()  # vocab.txt + tokenizer_config.json remain
    out = tmp_path / "bundle"
    manifest = _compile(folder, out)
    tok = manifest["runtime"]["tokenizer"]
    assert tok["tokenizer_json"].startswith("saved from Transformers' fast tokenizer")
    assert manifest["files"]["tokenizer/tokenizer.json"]["sha256"] == sha256_file(
        out / "tokenizer/tokenizer.json"
    )
    emb = load(out)([*TEXTS, LONG])
    np.testing.assert_allclose(emb, load(bert_bundle[0])([*TEXTS, LONG]), atol=1e-5)


def test_a_tokenizer_json_that_tokenizes_unlike_the_model_is_replaced(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Transformers honours tokenizer_config.json's ``do_lower_case: false`` over the folder's
    (lower-casing) tokenizer.json: the bundle gets the tokenizer the compile used, not the file."""
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.bundle_assets import bundle_tokenizer
    from compressor.runtime import TokenizerSettings, configured_tokenizer, encode

    folder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "model"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    adapter = HFEncoderAdapter()
    model = adapter.load(str(folder))
    (tmp_path / "bundle").mkdir()
    tok = bundle_tokenizer(adapter.tokenizer, "sentence-embedding", model, tmp_path / "bundle")
    assert "the folder's own tokenizes differently" in tok["tokenizer_json"]
    assert (tmp_path / "bundle/tokenizer/tokenizer.json").read_bytes() != (
        folder / "tokenizer.json"
    ).read_bytes()
    text = (tmp_path / "bundle/tokenizer/tokenizer.json").read_text()
    runtime = configured_tokenizer(text, TokenizerSettings.from_dict(tok["settings"], "settings"))
    ids = encode(runtime, ["Hello World"])["input_ids"][0].tolist()
    assert ids == adapter.tokenizer("Hello World")["input_ids"] == [101, 100, 100, 102]  # cased: unknown


def test_the_runtime_pads_as_the_compile_did(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A decoder tokenizer padded with its end-of-sequence token (what the causal-LM adapter
    does without a pad token): the bundle records it, and the runtime pads with it."""
    from compressor.adapters.causal_lm import CausalLMAdapter
    from compressor.bundle_assets import bundle_tokenizer
    from compressor.runtime import TokenizerSettings, configured_tokenizer, encode

    adapter = CausalLMAdapter()
    model = adapter.load(str(tiny_llama_dir))
    adapter.tokenizer.pad_token = adapter.tokenizer.sep_token
    tok = bundle_tokenizer(adapter.tokenizer, "causal-lm", model, tmp_path)
    assert tok["settings"]["pad_id"] == 102 and tok["settings"]["pad_token"] == "[SEP]"
    assert sorted(tok["files"]) == [
        f"tokenizer/{n}"
        for n in (
            "generation_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
        )
    ]
    text = (tmp_path / "tokenizer/tokenizer.json").read_text()
    runtime = configured_tokenizer(text, TokenizerSettings.from_dict(tok["settings"], "settings"))
    enc = encode(runtime, ["short", "a longer text than that"])
    assert enc["input_ids"][0, -1] == 102 and enc["attention_mask"][0, -1] == 0


@pytest.fixture(scope="module")
def llama_bundle(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rt-llama") / "bundle"
    _compile(tiny_llama_dir, out, [{"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [8]}])
    return out


def test_causal_lm_logits_match_the_original(llama_bundle: Path, tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((llama_bundle / "manifest.json").read_text())
    section = manifest["runtime"]
    assert section["kind"] == "causal-lm" and "pooling" not in section
    assert (tiny_llama_dir / "generation_config.json").is_file()  # save_pretrained writes one
    assert section["generation_config"] == "tokenizer/generation_config.json"
    assert "tokenizer/generation_config.json" in manifest["files"]
    lm = load(llama_bundle)
    assert isinstance(lm, CausalLM)
    out = lm(TEXTS)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    np.testing.assert_array_equal(out.input_ids, enc["input_ids"].numpy())
    np.testing.assert_array_equal(out.attention_mask, enc["attention_mask"].numpy())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        ref = model(**enc, use_cache=False).logits.numpy()
    assert out.logits.dtype == np.float32 and out.logits.shape == ref.shape
    keep = out.attention_mask.astype(bool)
    assert np.abs(out.logits[keep] - ref[keep]).max() < 1e-4 * np.abs(ref[keep]).max()


def test_a_causal_lm_bundle_without_onnx_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    manifest = _compile(tiny_llama_dir, tmp_path / "bundle", exports=[])
    assert (
        manifest["runtime"]["onnx"] is None
        and (tmp_path / "bundle" / "tokenizer" / "tokenizer.json").is_file()
    )
    with pytest.raises(BundleLoadError, match=r"has no ONNX model; add `- format: onnx`"):
        load(tmp_path / "bundle")


def _readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"<!-- runtime-snippet -->\s*```python\n(.*?)```\s*<!-- /runtime-snippet -->", readme, re.S
    )
    assert found, (
        "README.md: no ```python block between <!-- runtime-snippet --> and <!-- /runtime-snippet -->"
    )
    return found.group(1)


def test_the_readme_snippet_runs_against_a_compiled_minilm(minilm_path: str, tmp_path: Path) -> None:
    """The Quick start's snippet, as written, on an fp32 MiniLM bundle compiled where the README's
    compile writes it (``out/minilm-cpu-int8-cpu`` under this test's working directory), in a
    Python without torch; its embeddings are the original model's."""
    snippet = _readme_snippet()
    assert len(snippet.strip().splitlines()) < 10
    path = re.search(r'load\("([^"]+)"\)', snippet)
    assert path, snippet
    manifest = _compile("default", tmp_path / path.group(1))
    tok = manifest["runtime"]["tokenizer"]
    assert (
        tok["settings"]["max_length"] == 256
        and tok["max_length_from"] == "sentence_bert_config.json max_seq_length"
    )
    script = tmp_path / "snippet.py"
    blocked = "import sys\nfor m in ('torch', 'transformers'):\n    sys.modules[m] = None\n"
    saved = "\nimport json\nprint(json.dumps({'texts': sentences, 'emb': emb.tolist()}))\n"
    script.write_text(blocked + snippet + saved, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    emb = np.array(result["emb"], dtype=np.float32)
    assert emb.shape == (len(result["texts"]), 384)
    ref = _reference_embeddings(minilm_path, result["texts"], 256)
    assert _cosines(emb, ref).min() > 0.99
