"""`compressor tune` end to end on a tiny BERT: real ONNX Runtime timings, a real probe and
verification, and the recipe it writes compiled back by `compressor compile`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from compressor.app.cli import main
from compressor.app.tune.plan_recipe import MARKER

DATA = {"calibration_samples": 16, "train_samples": 32, "eval_samples": 24, "max_length": 32, "batch_size": 8}


def _base(tmp_path: Path, tiny: Path) -> Path:
    recipe = {
        "name": "tiny-base",
        "target": "cpu",
        "model": {"source": str(tiny)},
        "data": DATA,
        "passes": [{"pass": "quantize", "targets": ["encoder.*"]}],
        "exports": [{"format": "onnx", "min_cosine": 0.99}],
        "evaluation": {"run_bench": False},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tune(tmp_path: Path, tiny: Path, out: Path, *extra: str) -> int:
    return main(
        ["tune", "--recipe", str(_base(tmp_path, tiny)), "--model", str(tiny), "--out", str(out),
         "--budget", "mean_cosine>=0.9", "--batch", "2,8", "--seq-len", "32", "--threads", "1",
         "--probe-steps", "3", "--recover-steps", "5", *extra]
    )  # fmt: skip


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tune_writes_a_recipe_that_compiles_and_reuses_its_profile(
    tiny_bert_dir: Path, tmp_path: Path, cache: Path, capsys
) -> None:
    out = tmp_path / "t" / "tuned.yaml"
    assert _tune(tmp_path, tiny_bert_dir, out, "--structures", "1x64") == 0
    text = out.read_text()
    assert text.splitlines()[0] == MARKER
    recipe = yaml.safe_load(text)
    assert recipe["evaluation"]["min_mean_cosine"] == 0.9
    record = json.loads((out.parent / "tune.json").read_text())
    assert record["latency"] == "measured" and record["fingerprint"]["threads"] == 1
    assert record["profile"]["measured"] > 0
    names = {s["name"] for s in record["structures"]}
    assert names == {"original", "1x64"}
    # every rejected form was measured no faster than float (or its parent) at some shape
    for r in record["rejected"]:  # by the profile's noise floor, or the layer's own where wider
        own = re.search(r"margin ([0-9.]+)", r["why"])
        margin = max(record["noise_margin"], float(own.group(1)) if own else 0.0)
        assert r["ratio"] > 1.0 - margin - 1e-9 or "than int8" in r["why"]
    chosen = record["chosen"]
    assert chosen is not None and record["verifications"]
    last = record["verifications"][-1]
    assert last["met"] and last["fidelity"] >= 0.9
    assert set(last["latency"]) == {"2x32", "8x32"}
    assert "<svg" in (out.parent / "tune-report.html").read_text()
    # the recipe compiles as it is, its floor the budget
    bundle = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(out), "--out", str(bundle), "--no-bench"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["passes"][-1]["metrics"]["mean_cosine"] >= 0.9
    # a second tune on this host reads the timings back from the cache
    capsys.readouterr()
    assert _tune(tmp_path, tiny_bert_dir, out, "--structures", "1x64", "--overwrite", "--no-verify") == 0
    again = json.loads((out.parent / "tune.json").read_text())
    assert again["profile"]["measured"] == 0 and again["profile"]["reused"] > 0


def test_tune_never_writes_over_the_users_files(
    tiny_bert_dir: Path, tmp_path: Path, cache: Path, capsys
) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: my own recipe\n")
    assert _tune(tmp_path, tiny_bert_dir, mine, "--structures", "none") == 2
    assert mine.read_text() == "name: my own recipe\n"
    assert "not a recipe compressor tune wrote" in capsys.readouterr().err
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "tune.json").write_text('{"mine": true}')
    assert _tune(tmp_path, tiny_bert_dir, folder / "tuned.yaml", "--structures", "none") == 2
    assert (folder / "tune.json").read_text() == '{"mine": true}'
    assert not (folder / "tuned.yaml").exists()
    assert not cache.exists()  # refused before any timing


def test_bad_budgets_are_one_line_errors(tiny_bert_dir: Path, tmp_path: Path, cache: Path, capsys) -> None:
    for budget, words in (("cosine 0.9", "METRIC>=VALUE"), ("perplexity_ratio>=1.1", "is a ceiling"),
                          ("mean_cosine<=0.9", "is a floor"), ("kl_per_token<=0.1", "kl_per_token is not one yet"), ("fd<=0", "must be above 0"),
                          ("perplexity_ratio<=0.9", "not in (1, 100)"),
                          ("mean_cosine>=1.5", "not in (0, 1)")):  # fmt: skip
        code = main(
            ["tune", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "x.yaml"), "--budget", budget]
        )
        assert code == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_compile_tune_runs_the_search_inside_a_compile(
    tiny_bert_dir: Path, tmp_path: Path, cache: Path
) -> None:
    bundle = tmp_path / "bundle"
    code = main(
        ["compile", "--tune", "--recipe", str(_base(tmp_path, tiny_bert_dir)), "--budget", "mean_cosine>=0.9",
         "--batch", "2,8", "--seq-len", "32", "--threads", "1", "--structures", "none", "--out", str(bundle),
         "--no-bench"]
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["recipe"]["evaluation"]["min_mean_cosine"] == 0.9
    assert [p["pass"] for p in manifest["recipe"]["passes"]][-1] == "distill"
    quantized = [p for p in manifest["recipe"]["passes"] if p["pass"] == "quantize"]
    assert quantized and all(p["targets"] for p in quantized)
    assert manifest["passes"][-1]["metrics"]["mean_cosine"] >= 0.9


def test_compile_tune_needs_a_budget(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["compile", "--tune", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "b")]) == 2
    assert "needs --budget" in capsys.readouterr().err


def test_a_gpu_target_without_its_gpu_is_estimated_and_says_so(
    tiny_bert_dir: Path, tmp_path: Path, cache: Path, capsys
) -> None:
    out = tmp_path / "gpu" / "tuned.yaml"
    code = main(
        ["tune", "--target", "h100", "--model", str(tiny_bert_dir), "--out", str(out), "--budget", "mean_cosine>=0.9",
         "--batch", "2,8", "--seq-len", "32", "--structures", "none"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "ESTIMATED" in printed and "not verified here" in printed
    record = json.loads((out.parent / "tune.json").read_text())
    assert record["latency"] == "estimated" and record["verifications"] == []
    assert record["fingerprint"]["device"] == "h100"
    assert "ESTIMATED" in out.read_text().splitlines()[2]
    assert not cache.exists()  # an estimate is never cached as a measurement
    # the recipe it wrote is one `compressor compile` accepts for the h100
    from compressor.app.compile import plan
    from compressor.recipe import load_recipe

    plan(load_recipe(out))


def test_a_cosine_budget_on_a_decoder_lm_is_pointed_to_its_perplexity(
    tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    code = main(
        [
            "tune",
            "--model",
            str(tiny_llama_dir),
            "--out",
            str(tmp_path / "t.yaml"),
            "--budget",
            "mean_cosine>=0.9",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "hf-causal-lm" in err and 'give --budget "perplexity_ratio<=VALUE"' in err
    assert not (tmp_path / "t.yaml").exists()


def test_each_layer_is_timed_at_the_rows_it_sees(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Token layers at [batch, seq]; the pooler, which the sentence-embedding graph never runs,
    is no candidate at all."""
    from compressor.app.tune.options import Budget, TuneOptions
    from compressor.app.tune.tune import Tuner

    opts = TuneOptions(
        budget=Budget.parse("mean_cosine>=0.9"),
        recipe=str(_base(tmp_path, tiny_bert_dir)),
        batches=(2, 8),
        seq_len=16,
    )
    tuner = Tuner(opts)
    tuner.load()
    rows = tuner.layer_rows(tuner.model)
    hidden = tuner.model.config.hidden_size
    assert rows["encoder.layer.0.attention.self.query"] == {
        (2, 16): (hidden, hidden, 2, 16),
        (8, 16): (hidden, hidden, 8, 16),
    }
    assert "pooler.dense" not in rows
    assert len(rows) == 6 * tuner.model.config.num_hidden_layers
