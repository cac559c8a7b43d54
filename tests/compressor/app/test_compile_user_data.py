"""A compile on the user's own data: a JSONL of sentences next to the recipe, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from compressor.app.cli import main
from compressor.data import dataset_description_paragraphs, split_of


def _sentences() -> list[str]:
    out = []
    for para in dataset_description_paragraphs():
        out += [s.strip() + "." for s in re.split(r"\.\s+", para) if len(s.split()) >= 5]
    return sorted(set(out))


def _recipe(tmp_path: Path, data: dict) -> Path:
    recipe = {
        "name": "mine",
        "target": "cpu",
        "model": {"source": "model"},  # relative to the recipe's folder, as the data
        "data": data,
        "passes": [{"pass": "quantize", "targets": ["encoder.*"], "smoothquant": True, "alpha": 0.5}],
        "exports": [{"format": "onnx"}],
        "evaluation": {"run_bench": False, "min_mean_cosine": 0.5},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_compile_from_a_jsonl_of_sentences(tiny_bert_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model").symlink_to(tiny_bert_dir)
    sentences = _sentences()
    assert len(sentences) >= 150
    with (tmp_path / "sentences.jsonl").open("w") as f:
        for s in sentences:
            f.write(json.dumps({"id": len(s), "sentence": s}) + "\n")
    data = {"source": "sentences.jsonl", "field": "sentence", "calibration_samples": 8, "eval_samples": 16}
    data.update(train_samples=0, batch_size=8)
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(_recipe(tmp_path, data)), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["corpus"] == "source" and manifest["data"]["eval"] == {"source": 16}
    final = manifest["passes"][-1]["metrics"]
    assert final["mean_cosine@domain=source"] == final["mean_cosine"]  # one domain: the user's
    assert manifest["batch_invariance"]["batch_invariant"] is False  # the cpu default: per tensor
    assert "domain=source" in (out / "report.md").read_text()
    held_out = [s for s in sentences if split_of(s) == "eval"]
    assert len(held_out) >= 16  # what the eval drew from: never calibrated on


def test_too_little_data_is_one_line_and_no_bundle(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "model").symlink_to(tiny_bert_dir)
    (tmp_path / "few.txt").write_text("\n".join(_sentences()[:30]) + "\n")
    data = {"source": "few.txt", "calibration_samples": 64, "eval_samples": 4, "train_samples": 0}
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(_recipe(tmp_path, data)), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "calibration examples" in errors[0] and "data.calibration_samples" in errors[0]
    )
    assert not out.exists()


def test_bench_judges_the_users_held_out_data_and_falls_back_without_it(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from compressor import api
    from compressor.app.bench import BenchConfig

    (tmp_path / "model").symlink_to(tiny_bert_dir)
    (tmp_path / "s.txt").write_text("\n".join(_sentences()) + "\n")
    data = {
        "source": "s.txt",
        "calibration_samples": 8,
        "eval_samples": 16,
        "train_samples": 0,
        "batch_size": 8,
    }
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(_recipe(tmp_path, data)), "--out", str(out)]) == 0
    config = BenchConfig(batch_sizes=(2,), seq_len=16, warmup=1, repeats=2, threads=1)
    own = api.bench(out, config)["engines"]["ort"]["fidelity"]
    assert own["texts"] == 16 and "mean_cosine@domain=source" in own  # the compile's held-out split
    (tmp_path / "s.txt").unlink()  # benched where the user's data is not
    fallback = api.bench(out, config)["engines"]["ort"]["fidelity"]
    assert "mean_cosine@domain=source" not in fallback and fallback["texts"] == 16
