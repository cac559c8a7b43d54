"""Every bad input is answered with one line and exit status 2, in bounded time and memory.

Driven through the real CLI in-process (``compressor.app.cli.main`` returns the exit status):
``compressor recipe validate FILE`` for hostile or careless recipes, ``compressor compile
--model DIR --out OUT`` for broken model folders. Each case asserts exit 2, exactly one
line on stderr starting ``error:`` that names the file or key, and that OUT was not
created. Run them with ``pytest tests/compressor/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from compressor.app.cli import main
from tests.conftest import TOKENIZER_FILES

_STAGE = re.compile(r"^\[ *\d+\.\d+s\] ")


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *names: str) -> str:
    """Run the CLI; assert exit 2 and one ``error:`` line on stderr naming each of ``names``
    (besides the compile's own ``[  0.0s] planning ...`` stage lines, nothing else)."""
    capsys.readouterr()  # what setting the case up printed (save_pretrained's progress bars)
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not _STAGE.match(line)]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---- recipes ----------------------------------------------------------------------------

_BOMB = "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
)

RECIPES: dict[str, tuple[str | bytes, str]] = {
    # name: (file contents, what the one line must name)
    "regex": ('passes:\n  - pass: quantize\n    targets: ["re:[unclosed"]\n', "passes[0].targets[0]"),
    "regex_ignore": ('passes:\n  - pass: sparsify\n    ignore: ["re:(a"]\n', "passes[0].ignore[0]"),
    "not_utf8": (b"name: caf\xe9\n", "not UTF-8"),
    "billion_laughs": (_BOMB, "YAML nodes"),
    "recursive_alias": ("passes: &p [*p]\n", "recursive"),
    "steps_1e12": ("passes:\n  - pass: distill\n    steps: 1000000000000\n", "passes[0].steps"),
    "nan_floor": ("evaluation:\n  min_mean_cosine: .nan\n", "evaluation.min_mean_cosine"),
    "inf_floor": ("evaluation:\n  min_mean_cosine: .inf\n", "evaluation.min_mean_cosine"),
    "floor_above_1": ("evaluation:\n  min_mean_cosine: 2.0\n", "evaluation.min_mean_cosine"),
    "nan_lr": ("passes:\n  - pass: distill\n    lr: .nan\n", "passes[0].lr"),
    "nan_in_list": ("passes:\n  - pass: quantize\n    alpha_grid: [0.5, .nan]\n", "passes[0].alpha_grid[1]"),
    "huge_batch": ("data:\n  batch_size: 100000000\n", "data.batch_size"),
    "huge_bench_repeats": ("evaluation:\n  bench:\n    repeats: 1000000000\n", "evaluation.bench.repeats"),
    "zero_lr_diffusion": ("passes:\n  - pass: guidance_distill\n    lr: 0\n", "passes[0].lr"),
    "long_list": (
        "evaluation:\n  bench:\n    batch_sizes: [" + ", ".join(["1"] * 2000) + "]\n",
        "batch_sizes",
    ),
    "bool_for_int": ("data:\n  batch_size: true\n", "data.batch_size"),
    "int_too_long_to_print": ("seed: " + "9" * 5000 + "\n", "not a usable YAML value"),
    "seed_negative": ("seed: -1\n", "seed"),
    "duplicate_key": ("name: a\nname: b\n", "duplicate key 'name'"),
    "not_a_mapping": ("- quantize\n- distill\n", "must be a mapping"),
    "scalar": ("just words\n", "must be a mapping"),
    "empty": ("", "must be a mapping"),
    "passes_not_a_list": ("passes: {pass: quantize}\n", "passes"),
    "pass_entry_not_a_mapping": ("passes: [quantize]\n", "passes[0]"),
    "pass_name_a_list": ("passes:\n  - pass: [quantize]\n", "passes[0].pass"),
    "target_a_list": ("target: [cpu]\n", "target"),
    "unknown_top_key": ("modle: {source: x}\n", "modle"),
    "name_escapes_out": ("name: ../../home\n", "name"),
    "python_tag": ('passes: !!python/object/apply:os.system ["echo pwned"]\n', "not valid YAML"),
    "bad_syntax": ("passes: [\n", "not valid YAML"),
    "tabs": ("name:\tx\n\tseed: 1\n", "not valid YAML"),
    "too_deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    "too_large": ("description: " + "x" * (2 << 20) + "\n", "larger than"),
    "two_documents": ("name: a\n---\nname: b\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipe_is_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, names = RECIPES[case]
    path = tmp_path / f"{case}.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    _refused(capsys, ["recipe", "validate", str(path), "--static"], str(path), names)
    assert time.perf_counter() - start < 10


def test_recipe_paths_that_are_not_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    _refused(capsys, ["recipe", "validate", str(missing)], str(missing), "no such recipe file")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    _refused(capsys, ["recipe", "validate", str(folder)], str(folder), "not a regular file")


def test_billion_laughs_is_refused_without_expanding(tmp_path: Path) -> None:
    """Nine levels of nine aliases expand to 9**9 (387 million) strings; refused in milliseconds
    and well under a few MB, because the size is counted per distinct node, never expanded."""
    import tracemalloc

    from compressor.errors import RecipeError
    from compressor.recipe import load_recipe

    path = tmp_path / "bomb.yaml"
    path.write_text(_BOMB, encoding="utf-8")
    assert path.stat().st_size < 1024
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(RecipeError, match="expands to more than"):
            load_recipe(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2
    assert peak < 16 << 20


def test_bounds_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`compressor passes --verbose` says each count's upper bound and that numbers are finite."""
    assert main(["passes", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps [integer at most 1,000,000]" in out
    assert "[integer 1 to 10,000]" in out  # calibration_batches
    assert "number (finite)" in out


def test_aliases_within_bounds_still_work(tmp_path: Path) -> None:
    from compressor.recipe import load_recipe

    path = tmp_path / "ok.yaml"
    path.write_text(
        "name: ok\npasses:\n  - pass: quantize\n    targets: &t ['encoder.*']\n"
        "  - pass: sparsify\n    targets: *t\n",
        encoding="utf-8",
    )
    recipe = load_recipe(path)
    assert recipe.passes[1].config.targets == ("encoder.*",)


# ---- model folders ----------------------------------------------------------------------


class _Hostile:
    """Unpickling this writes a marker file: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _save_bert(folder: Path, minilm_path: str, vocab_size: int = 30522, tokenizer: bool = True) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).eval().save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        for name in TOKENIZER_FILES:
            if (Path(minilm_path) / name).exists():
                shutil.copy(Path(minilm_path) / name, folder / name)


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.endswith("query.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _hostile_pickle(folder: Path, decoy: str) -> None:
    (folder / "model.safetensors").unlink()
    (folder / decoy).write_bytes(b"")
    with (folder / "pytorch_model.bin").open("wb") as f:
        pickle.dump(_Hostile(folder.parent / "PWNED"), f)


def _stub_vocab(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")


def _junk_vocab(folder: Path) -> None:
    """A vocabulary as large as the (64-row) embedding, of tokens no English word uses."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    junk = [f"zq{i}x" for i in range(59)]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *junk]) + "\n")


def _broken_tokenizer_json(folder: Path) -> None:
    (folder / "vocab.txt").unlink()
    (folder / "tokenizer.json").write_text("{ not json")


def _shard_outside(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder.parent / "elsewhere.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _not_a_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("a file, not a model folder")


FOLDERS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (how the working tiny BERT folder is broken, what the one line must name)
    "does_not_exist": (lambda f: shutil.rmtree(f), "does not exist"),
    "is_a_file": (_not_a_folder, "is a file"),
    "no_config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{'model_type': bert"), "config.json"),
    "config_not_utf8": (
        lambda f: (f / "config.json").write_bytes(b'{"model_type": "b\xe9rt"}'),
        "config.json",
    ),
    "config_a_list": (lambda f: (f / "config.json").write_text('["bert"]'), "config.json"),
    "unknown_model_type": (lambda f: _edit_config(f, model_type="no-such-family"), "no-such-family"),
    "no_model_type": (lambda f: _edit_config(f, model_type=None), "model_type"),
    "auto_map": (lambda f: _edit_config(f, auto_map={"AutoModel": "evil.EvilModel"}), "auto_map"),
    "tokenizer_auto_map": (
        lambda f: (f / "tokenizer_config.json").write_text(
            json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}})
        ),
        "tokenizer_config.json",
    ),
    "truncated_safetensors": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors",
    ),
    "random_safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(
            torch.randint(0, 256, (4096,)).byte().numpy().tobytes()
        ),
        "model.safetensors",
    ),
    "empty_safetensors": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors"),
    "pickle_beside_decoy": (lambda f: _hostile_pickle(f, "decoy.safetensors"), "pytorch_model.bin"),
    "pickle_beside_empty_model_safetensors": (
        lambda f: _hostile_pickle(f, "model.safetensors"),
        "model.safetensors",
    ),
    "shard_outside_folder": (_shard_outside, "elsewhere.safetensors"),
    "shape_mismatch": (lambda f: _edit_config(f, intermediate_size=48), "of another shape"),
    "weights_missing": (lambda f: _edit_config(f, num_hidden_layers=3), "missing from the file"),
    "nan_weights": (_nan_weights, "query.weight"),
    "no_tokenizer": (lambda f: [(f / n).unlink(missing_ok=True) for n in TOKENIZER_FILES], "no tokenizer"),
    "stub_vocabulary": (_stub_vocab, "5 tokens"),
    "broken_tokenizer_json": (_broken_tokenizer_json, "tokenizer"),
    "bad_config_value": (lambda f: _edit_config(f, num_attention_heads=5), "does not load"),
}


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_bad_model_folder_is_one_line_exit_2(
    case: str, tmp_path: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    breaks, names = FOLDERS[case]
    breaks(folder)
    out = tmp_path / "bundle"
    line = _refused(capsys, ["compile", "--model", str(folder), "--out", str(out), "--no-bench"], names)
    assert str(folder) in line or "model.source" in line
    assert not out.exists()
    assert not (tmp_path / "PWNED").exists()


def test_tokenizer_of_unknown_words_is_refused(
    tmp_path: Path, minilm_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vocabulary the size of the embedding but of no English word: the probe is all [UNK]."""
    folder = tmp_path / "model"
    _save_bert(folder, minilm_path, vocab_size=64, tokenizer=False)
    _junk_vocab(folder)
    out = tmp_path / "bundle"
    _refused(capsys, ["compile", "--model", str(folder), "--out", str(out)], str(folder), "unknown token")
    assert not out.exists()


def test_tokenizer_ids_past_the_embedding_are_refused(
    tmp_path: Path, minilm_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "model"
    _save_bert(folder, minilm_path, vocab_size=1000)
    out = tmp_path / "bundle"
    _refused(capsys, ["compile", "--model", str(folder), "--out", str(out)], str(folder), "vocab_size")
    assert not out.exists()


def test_causal_lm_without_tokenizer_is_refused(
    tmp_path: Path, minilm_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    out = tmp_path / "bundle"
    _refused(capsys, ["compile", "--model", str(folder), "--out", str(out)], str(folder), "no tokenizer")
    assert not out.exists()


def test_the_untouched_tiny_folder_loads(tiny_bert_dir: Path) -> None:
    """The checks refuse the broken folders above, not a good one."""
    from compressor.adapters import make_adapter

    model = make_adapter("auto", str(tiny_bert_dir)).load(str(tiny_bert_dir))
    assert sum(p.numel() for p in model.parameters()) > 0
