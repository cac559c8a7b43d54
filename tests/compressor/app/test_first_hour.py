"""A stranger's first hour (issue 15, part 5): what a new user sees is right and says what it means.

The GPU targets' default recipe, the compile summary's "what was measured", the Triton
repository's choice of ONNX and batch sizes, the digits recipe's teacher folder, progress
for every long step, the HTML report's CSS and chart titles, `compressor passes` and
`--help`, and tail percentiles from too few runs.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from compressor.app.cli import DEFAULT_GPU_RECIPE, DEFAULT_RECIPE, _load, build_parser, default_recipe, main
from compressor.app.report import (
    bench_charts,
    bench_table,
    measurement_notes,
    pass_table,
    percentile_note,
    render_bench_html,
    render_html,
)
from compressor.pipeline import Pass, PassContext, PassOutput, PassResult, Pipeline


class Recorder:
    """A progress factory that keeps every bar it made."""

    def __init__(self) -> None:
        self.bars: list[RecordedBar] = []

    def __call__(self, desc: str, total: int | None, unit: str) -> RecordedBar:
        bar = RecordedBar(desc, total, unit)
        self.bars.append(bar)
        return bar


class RecordedBar:
    def __init__(self, desc: str, total: int | None, unit: str) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.n, self.closed = 0, False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        self.closed = True


# ---- 1. the GPU targets' default recipe and the compile summary ------------------------------


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"recipe": None, "target": None, "model": None, **kw})


@pytest.mark.parametrize("target", ["a100", "h100", "orin"])
def test_a_gpu_target_without_recipe_gets_the_gpu_recipe(target: str) -> None:
    assert default_recipe(target) == DEFAULT_GPU_RECIPE
    recipe = _load(_args(target=target))
    assert recipe.name == "minilm-gpu-int8" and recipe.target == target
    assert [e.format for e in recipe.exports] == ["onnx_qdq", "tensorrt", "triton_repository"]
    (quantize,) = [p for p in recipe.passes if p.name == "quantize"]
    assert quantize.config.activations == "static_per_tensor" and quantize.config.smoothquant
    assert recipe.evaluation.min_mean_cosine is not None
    # The bundle is named after the recipe that ran: out/minilm-gpu-int8-a100, not minilm-cpu-int8-a100.
    help_text = _commands(build_parser())["compile"].format_help()
    assert DEFAULT_GPU_RECIPE in help_text


def test_the_cpu_keeps_its_default() -> None:
    assert default_recipe(None) == default_recipe("cpu") == DEFAULT_RECIPE
    assert _load(_args(target="cpu")).name == DEFAULT_RECIPE
    # an explicit recipe still wins over the target's default
    assert _load(_args(target="a100", recipe="minilm-24-int8")).name == "minilm-24-int8"


@pytest.mark.parametrize("target", ["a100", "h100", "orin"])
def test_gpu_recipe_plan_checks_on_every_gpu_target(target: str, tiny_bert_dir: Path) -> None:
    from compressor.app.compile import plan

    recipe = _load(_args(target=target, model=str(tiny_bert_dir)))
    plan(recipe)  # raises on an illegal plan


def _gpu_recipe(tiny_bert_dir: Path, exports: list[dict[str, Any]], run_bench: bool) -> dict[str, Any]:
    return {
        "name": "tiny-gpu",
        "target": "a100",
        "model": {"source": str(tiny_bert_dir)},
        "data": {
            "calibration_samples": 8,
            "train_samples": 0,
            "eval_samples": 8,
            "max_length": 16,
            "batch_size": 8,
        },
        "passes": [{"pass": "quantize", "targets": ["encoder.*"], "activations": "static_per_tensor"}],
        "exports": exports,
        "evaluation": {
            "run_bench": run_bench,
            "bench": {"batch_sizes": [1, 4], "seq_len": 16, "warmup": 1, "repeats": 3, "threads": 1},
        },
    }


def test_gpu_compile_summary_says_what_was_and_was_not_measured(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exports: list[dict[str, Any]] = [
        {"format": "onnx_qdq", "verify_batch_sizes": [1, 3], "verify_lengths": [16]},
        {"format": "tensorrt"},
        {"format": "triton_repository"},
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_gpu_recipe(tiny_bert_dir, exports, run_bench=True)))
    out = tmp_path / "bundle"
    assert main(["compile", "--recipe", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    # No CPU timing presented as the A100's: the benchmark is skipped, and the summary says why.
    assert "benchmark" not in manifest and "a100" in manifest["benchmark_skipped"]
    assert "speedup" not in text and "items/s" not in text
    assert "not timed: target a100 is a GPU" in text
    assert re.search(
        r"not built or timed here: the TensorRT engine model_a100\.plan .*build_engine_a100\.sh", text
    )
    assert "measured here: the Q/DQ ONNX in ONNX Runtime on this host's CPU" in text
    report = (out / "report.md").read_text()
    assert "## What was measured" in report and "not built or timed here" in report
    # The Triton repository serves the Q/DQ ONNX without being told to.
    assert manifest["verification"]["triton_repository"]["serves"] == "model.qdq.onnx"


def test_a_cpu_benchmark_of_a_gpu_bundle_is_labelled_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    from compressor.app.cli import _print_compile_summary

    manifest = _manifest(target={"name": "a100", "device": "cuda"}, bench=_bench(repeats=20))
    _print_compile_summary(manifest, Path("out/x"), "x")
    text = capsys.readouterr().out
    assert "benchmark: CPU (ONNX Runtime) on this host, not the a100" in text
    notes = measurement_notes(manifest)
    assert any("say nothing about speed on the a100" in n for n in notes)
    assert "not measured: latency and throughput on the a100" in text


# ---- 2. the Triton repository ------------------------------------------------------------------
# (tests/exporters/test_triton_repository.py has the exporter-level tests)


# ---- 3. the digits recipe's teacher folder -------------------------------------------------------


def test_digits_recipe_names_the_command_that_makes_its_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("diffusers")
    from compressor.recipe import SHIPPED_BASE, load_recipe

    recipe = load_recipe("digits-steps-consistency")
    # Resolved against the checkout, where benchmarks/train_digits_teacher.py writes, not the cwd.
    assert Path(recipe.model.source) == SHIPPED_BASE / "benchmarks" / ".cache" / "digits-teacher"
    monkeypatch.chdir(tmp_path)
    assert load_recipe("digits-steps-consistency").model.source == recipe.model.source
    if Path(recipe.model.source).exists():
        pytest.skip("the digits teacher has been trained on this machine")
    assert main(["recipe", "validate", "digits-steps-consistency"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python benchmarks/train_digits_teacher.py" in err
    assert "does not exist" in err and str(SHIPPED_BASE / "benchmarks") in err


def test_a_recipe_files_relative_source_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compressor.recipe import load_recipe

    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "../models/m"}, "target": "cpu"}))
    monkeypatch.chdir(tmp_path / "recipes")
    expected = (tmp_path / "models" / "m").resolve()
    assert Path(load_recipe("r.yaml").model.source) == expected
    monkeypatch.chdir(tmp_path)  # from anywhere else: the same folder
    assert Path(load_recipe(str(path)).model.source) == expected
    assert load_recipe(str(path)).with_model("default").model.source == "default"
    path.write_text(yaml.safe_dump({"model": {"source": "default"}, "target": "cpu"}))
    assert load_recipe(str(path)).model.source == "default"


# ---- 4. progress for every long step, and the time measuring takes ---------------------------------


def test_quantize_reports_each_calibration_eval(tiny_ctx: Any) -> None:
    from compressor.passes.quantize.quantize import QuantizePass, quantize_config

    adapter, model, ctx = tiny_ctx
    ctx.progress = Recorder()
    cfg = quantize_config(targets=("encoder.*",), smoothquant=True, alpha_grid=(0.5, 0.8), max_float_layers=1)
    QuantizePass(cfg).run(model, ctx)
    (bar,) = ctx.progress.bars
    assert bar.desc.startswith("quantize") and bar.unit == "eval" and bar.closed
    assert bar.n >= 3 and bar.total is not None and bar.n <= bar.total  # 2 alphas + the final + mixed


def test_sparsegpt_reports_each_layer(tiny_ctx: Any) -> None:
    from compressor.passes.sparsity.sparsify import SparsifyConfig, SparsifyPass

    adapter, model, ctx = tiny_ctx
    ctx.progress = Recorder()
    SparsifyPass(SparsifyConfig(targets=("encoder.*",), method="sparsegpt")).run(model, ctx)
    (bar,) = ctx.progress.bars
    assert bar.unit == "layer" and bar.closed and bar.n == bar.total and bar.n > 0


def test_distill_reports_through_the_same_factory(tiny_ctx: Any) -> None:
    from compressor.distill.config import RecoverConfig
    from compressor.distill.loop import distill_

    adapter, model, ctx = tiny_ctx
    rec = Recorder()
    distill_(model, ctx.teacher, adapter, ctx.data.train, RecoverConfig(steps=3, warmup_steps=1), rec)
    (bar,) = rec.bars
    assert bar.desc == "distill" and bar.n == 3 and bar.total == 3 and bar.closed


def test_diffusion_training_loops_report_each_step() -> None:
    from compressor.passes.diffusion.training import fit

    student = nn.Linear(4, 4)
    x = torch.randn(8, 4)
    rec = Recorder()
    with PassContext(None, None, None, None, progress=rec).progress_bar("consistency_distill", 5) as bar:
        fit(student, lambda step: (student(x) ** 2).mean(), 5, 1e-3, "t", bar=bar)
    assert rec.bars[0].n == 5 and rec.bars[0].closed


def test_diffusion_passes_open_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor.passes.diffusion import consistency_distill as cd
    from compressor.passes.diffusion import guidance_distill as gd

    seen: list[Any] = []

    def fake(model: Any, data: Any, cfg: Any, seed: int, bar: Any = None) -> Any:
        seen.append(bar)
        bar.update(cfg.train_steps)
        return model, [1.0]

    monkeypatch.setattr(gd, "guidance_distill", fake)
    monkeypatch.setattr(cd, "consistency_distill", fake)
    rec = Recorder()
    ctx = PassContext(None, None, None, None, progress=rec)
    gd.GuidanceDistillPass(gd.GuidanceDistillConfig(train_steps=7)).run(object(), ctx)
    cd.ConsistencyDistillPass(cd.ConsistencyDistillConfig(train_steps=9)).run(object(), ctx)
    assert [(b.desc, b.total, b.n, b.closed) for b in rec.bars] == [
        ("guidance_distill", 7, 7, True),
        ("consistency_distill", 9, 9, True),
    ]


def test_no_progress_means_no_bar(tiny_ctx: Any) -> None:
    from compressor.progress import NullProgress

    _, _, ctx = tiny_ctx
    with ctx.progress_bar("x", 3) as bar:
        assert isinstance(bar, NullProgress)


class _Noop(Pass):
    name = "noop"
    description = "does nothing"
    Config = type(None)

    def __init__(self) -> None:
        self.config = None

    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        time.sleep(0.05)
        return PassOutput(model)


class _SlowMeasure:
    def before_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext, result: PassResult) -> None:
        time.sleep(0.3)
        result.metrics["mean_cosine"] = 1.0


def test_wall_time_includes_the_measuring_after_each_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("compressor.pipeline.to_dict", lambda c: {})
    measured: list[str] = []
    pipe = Pipeline(
        [_Noop()], instruments=[_SlowMeasure()], on_measure_start=lambda p: measured.append(str(p))
    )
    pipe.run(nn.Linear(2, 2), PassContext(None, None, None, None))
    original, noop = pipe.results
    assert noop.measure_s >= 0.3 and noop.wall_s >= noop.measure_s + 0.05
    assert original.wall_s >= 0.3  # the first measuring is timed too
    assert len(measured) == 2
    rows = pass_table([r.to_dict() for r in pipe.results])
    assert rows[0][:3] == ["pass", "wall s", "measure s"]
    assert float(rows[2][1]) >= 0.3 and float(rows[2][2]) >= 0.3
    # a manifest from before measure_s was kept still renders
    assert pass_table([{"pass": "old", "wall_s": 1.0, "metrics": {}}])[1][:3] == ["old", "1.0", "-"]


# ---- 5. report.html: CSS that parses, charts with titles -------------------------------------------


def _bench(repeats: int) -> dict[str, Any]:
    def stats(ms: float) -> dict[str, Any]:
        return {
            "median_ms": ms,
            "p90_ms": ms * 1.1,
            "p99_ms": ms * 1.2,
            "throughput_per_s": 1000 / ms,
            "repeats": repeats,
            "speedup_vs_ort_fp32": 1.5,
        }

    return {
        "device": "cpu",
        "threads": 2,
        "seq_len": 16,
        "baseline": "ort_fp32",
        "engines": {
            "ort_fp32": {
                "status": "ok",
                "fidelity": {"mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0, "texts": 8},
            },
            "ort": {
                "status": "ok",
                "fidelity": {"mean_cosine": 0.99, "min_cosine": 0.98, "spearman": 0.99, "texts": 8},
            },
        },
        "latency": [
            {"batch": b, "seq_len": 16, "engines": {"ort_fp32": stats(2.0 * b), "ort": stats(1.0 * b)}}
            for b in (1, 8)
        ],
    }


def _manifest(target: dict[str, str] | None = None, bench: dict[str, Any] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": "tiny",
        "target": target or {"name": "cpu", "device": "cpu"},
        "artifacts": {"onnx": "model.onnx"},
        "passes": [{"pass": "original", "wall_s": 0.5, "measure_s": 0.5, "metrics": {"mean_cosine": 1.0}}],
        "verification": {"onnx": {"cases": 3, "min_cosine": 0.9999}},
    }
    if bench:
        m["benchmark"] = bench
    return m


def _css(page: str) -> str:
    (css,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    return str(css)


@pytest.mark.parametrize("page", ["compile", "bench"])
def test_report_css_parses_and_styles_the_tables(page: str) -> None:
    html = (
        render_html(_manifest(bench=_bench(20))) if page == "compile" else render_bench_html(_bench(20), "t")
    )
    css = _css(html)
    assert "{{" not in html and "}}" not in html
    # every rule is `selector{declarations}`, braces balanced and never nested
    rules = re.findall(r"([^{}]+)\{([^{}]*)\}", css)
    assert "".join(f"{s}{{{d}}}" for s, d in rules) == css
    selectors = {s.strip() for s, _ in rules}
    assert {"body", "table", "td,th"} <= selectors
    assert any("border-collapse:collapse" in d for _, d in rules)


def test_every_chart_has_a_visible_title() -> None:
    charts = bench_charts(_bench(20))
    assert len(charts) == 2
    for svg in charts:
        (title,) = re.findall(r"<text class='chart-title'[^>]*>([^<]+)</text>", svg)
        assert title.strip() and "cpu, 2 threads" in title
    from compressor.app.plots import line_chart

    with pytest.raises(ValueError, match="needs a title"):
        line_chart({"a": [(1, 1.0)]}, "", "x", "y")


# ---- 6. passes, --help, tail percentiles ----------------------------------------------------------


def test_passes_lines_up_and_describes_sparsify_fully(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}
    assert len(starts) == 1  # every description starts in the same column
    (sparsify,) = [line for line in lines if line.startswith("sparsify ")]
    assert "magnitude" in sparsify and "SparseGPT" in sparsify


def test_passes_verbose_lists_nested_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes", "--verbose"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("\nprune ") :]
    block = block[: block.index("\nquantize ")]
    # recover: is a block, its options listed one level in, and its nested loss: block one more
    assert re.search(r"^    recover: block \(RecoverConfig\) = null \(off\)$", block, re.M)
    assert re.search(r"^        steps: int = ", block, re.M)
    assert re.search(r"^        loss: block \(DistillLossConfig\)", block, re.M)
    assert re.search(r"^            hidden_weight: float = ", block, re.M)
    distill = out[out.index("\ndistill ") :]
    assert re.search(r"^    loss: block \(DistillLossConfig\) = \{\.\.\.\}$", distill, re.M)
    assert re.search(r"^        output: ", distill, re.M)


def test_help_lists_every_command() -> None:
    parser = build_parser()
    text = parser.format_help()
    commands = _commands(parser)
    assert {"kernels", "verify", "compile", "bench"} <= set(commands)
    synopses = text[text.index("commands:") : text.index("positional arguments")]
    for name in commands:
        assert f"compressor {name}" in synopses, name


@pytest.mark.parametrize(("repeats", "p90", "p99"), [(3, False, False), (20, True, False), (100, True, True)])
def test_tail_percentiles_need_enough_runs(repeats: int, p90: bool, p99: bool) -> None:
    rows = bench_table(_bench(repeats))
    header, first = rows[0], rows[1]
    assert header[2] == "runs" and first[2] == str(repeats)
    assert (first[header.index("p90 ms")] != "-") is p90
    assert (first[header.index("p99 ms")] != "-") is p99
    note = percentile_note(_bench(repeats))
    if p99:
        assert note is None
    else:
        assert note is not None and f"{repeats} timed runs" in note


def test_bench_prints_the_percentile_note(capsys: pytest.CaptureFixture[str]) -> None:
    from compressor.app.cli import _print_bench

    _print_bench(_bench(3))
    out = capsys.readouterr().out
    assert "note: p90 and p99 shown as '-': 3 timed runs per row" in out


def test_the_pass_table_shows_each_familys_own_metrics() -> None:
    """A diffusion compile's table shows FD and class accuracy (it showed only `-`); a decoder's
    its perplexity, ratio, KL and top-1 agreement, its logit cosines left to the manifest."""
    diffusion = [
        {"pass": "original", "wall_s": 1.0, "metrics": {"fd": 1.7091, "class_acc": 1.0, "steps": 50.0}}
    ]
    rows = pass_table(diffusion)
    assert rows[0][3:] == ["FD", "class acc", "steps"] and rows[1][3:] == ["1.709", "1.000", "50"]
    lm = [{"pass": "quantize", "wall_s": 2.0, "metrics": {"perplexity": 180.2, "perplexity_ratio": 1.0123,
           "kl_per_token": 0.01, "top1_agreement": 0.97, "mean_cosine": 0.99, "params": 1e6}}]  # fmt: skip
    assert pass_table(lm)[0][3:] == ["ppl", "ppl ratio", "KL/token", "top-1 agree", "params"]
    encoder = [{"pass": "quantize", "wall_s": 2.0, "metrics": {"mean_cosine": 0.998, "min_cosine": 0.99}}]
    assert pass_table(encoder)[0][3:] == ["mean cos", "min cos"]
    from compressor.app.report import measurement_notes

    assert "perplexity ratio 1.0123" in measurement_notes({"passes": lm})[0]
    assert "Frechet distance 1.709" in measurement_notes({"passes": diffusion})[0]
    assert "mean cosine 0.99800" in measurement_notes({"passes": encoder})[0]
