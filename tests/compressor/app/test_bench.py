"""`compressor bench` across engines, on the tiny int8 BERT bundle (ONNX, ExportedProgram,
AOTInductor package): every engine runs the same inputs, its latency is measured in one
rotation with the baseline, and its outputs are scored against the original model."""

from __future__ import annotations

import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from compressor.app.bench import BenchConfig, bench_bundle
from compressor.app.cli import main
from compressor.app.engines import EngineUnavailable
from compressor.app.plots import line_chart, scatter_chart
from compressor.errors import CompressorError
from compressor.manifest import sha256_file
from compressor.trust import sign_bundle

FAST = {"batch_sizes": (1, 3), "seq_len": 16, "threads": 1, "warmup": 1, "repeats": 3, "fidelity_texts": 16}


@pytest.fixture(scope="module")
def result(aoti_bundle, native_runner: Path) -> dict[str, Any]:
    out, _, _ = aoti_bundle
    return bench_bundle(out, BenchConfig(runner=native_runner, **FAST))


@pytest.mark.slow
def test_every_engine_of_the_bundle_runs(result, aoti_bundle) -> None:
    engines = result["engines"]
    # all: the baseline plus one engine per artifact (torch_export gives eager and compile; the
    # package gives the in-process loader and the C++ runner); the bundle has no Q/DQ ONNX or plan
    assert list(engines) == ["ort_fp32", "ort", "torch_eager", "torch_compile", "aoti", "native"]
    assert all(s["status"] == "ok" for s in engines.values()), engines
    assert engines["native"]["timed"] == "own process" and engines["ort"]["timed"] == "rotated"
    assert result["baseline"] == "ort_fp32"
    assert [r["batch"] for r in result["latency"]] == [1, 3]
    for row in result["latency"]:
        assert set(row["engines"]) == set(engines)
        for name, s in row["engines"].items():
            assert 0 < s["median_ms"] <= s["p99_ms"], (name, s)
            assert s["throughput_per_s"] == pytest.approx(row["batch"] * 1000 / s["median_ms"], rel=0.01)
            assert s["speedup_vs_ort_fp32"] == pytest.approx(  # stored to 3 decimals
                row["engines"]["ort_fp32"]["median_ms"] / s["median_ms"], rel=0.01, abs=5e-4
            )
        assert row["engines"]["ort_fp32"]["speedup_vs_ort_fp32"] == 1.0


@pytest.mark.slow
def test_engines_compute_the_compressed_model(result, aoti_bundle) -> None:
    """Each engine's outputs, scored against the original model, agree with the pipeline's own
    measurement of the compressed model and with each other: no engine ran something else."""
    _, manifest, _ = aoti_bundle
    final = manifest["passes"][-1]["metrics"]["mean_cosine"]
    fid = {n: s["fidelity"] for n, s in result["engines"].items()}
    assert fid["ort_fp32"]["mean_cosine"] > 0.99999  # the original, exported as-is
    assert fid["native"] is None  # the runner reports latency only
    for name in ("ort", "torch_eager", "torch_compile", "aoti"):
        assert fid[name]["texts"] == 16
        assert abs(fid[name]["mean_cosine"] - final) < 0.002, (name, fid[name], final)
        assert fid[name]["mean_cosine"] < 0.99999  # int8 is not the original
    assert fid["aoti"]["min_cosine"] == pytest.approx(fid["torch_eager"]["min_cosine"], abs=1e-4)


@pytest.mark.slow
def test_asked_for_engines_that_cannot_run_are_errors(aoti_bundle) -> None:
    out, _, _ = aoti_bundle
    with pytest.raises(EngineUnavailable, match="ort_qdq: the bundle has no artifacts.onnx_qdq"):
        bench_bundle(out, BenchConfig(engines=("ort_qdq",), **FAST))
    with pytest.raises(CompressorError, match="unknown engine"):
        bench_bundle(out, BenchConfig(engines=("ort", "trt"), **FAST))


@pytest.mark.slow
def test_auto_lists_what_it_could_not_run(aoti_bundle, tmp_path: Path) -> None:
    """A bundle naming a TensorRT plan, benched where TensorRT does not import (or on the CPU):
    the plan is listed as not run, with the reason, and the other engines still run."""
    pytest.importorskip("onnxruntime")
    src, manifest, _ = aoti_bundle
    shutil.copy(src / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "model_a100.plan").write_bytes(b"not a plan")
    files = {n: {"sha256": sha256_file(tmp_path / n)} for n in ("model.onnx", "model_a100.plan")}
    m = dict(manifest, artifacts={"onnx": "model.onnx", "tensorrt_plan": "model_a100.plan"}, files=files)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    sign_bundle(tmp_path)  # trusted: the plan is skipped for what this machine lacks, not for trust
    r = bench_bundle(tmp_path, BenchConfig(fidelity=False, **FAST))
    assert r["engines"]["ort"]["status"] == "ok"
    assert r["engines"]["tensorrt"]["status"] == "skipped"
    assert re.search(r"tensorrt: (the tensorrt package does not import|needs the bench on a CUDA)",
                     r["engines"]["tensorrt"]["reason"])  # fmt: skip
    assert set(r["latency"][0]["engines"]) == {"ort_fp32", "ort"}


@pytest.mark.slow
def test_an_unsigned_copy_of_the_bundle_runs_only_its_onnx(aoti_bundle, tmp_path: Path) -> None:
    """The same bundle without its signature (a bundle from elsewhere): its ExportedProgram and
    AOTInductor package are not loaded, each named with the reason; ONNX Runtime still runs."""
    src, _, _ = aoti_bundle
    shutil.copytree(src, tmp_path / "copy")
    (tmp_path / "copy" / "manifest.sig").unlink()
    r = bench_bundle(tmp_path / "copy", BenchConfig(fidelity=False, **FAST))
    assert r["trust"]["trusted"] is False and r["trust"]["signature"] == "unsigned"
    assert [n for n, s in r["engines"].items() if s["status"] == "ok"] == ["ort_fp32", "ort"]
    for name in ("torch_eager", "torch_compile", "aoti", "native"):
        assert r["engines"][name]["reason"].startswith(
            "skipped: the bundle is not signed by this machine's key"
        )
    with pytest.raises(CompressorError, match="--engines aoti: the bundle is not signed .*pass --trust"):
        bench_bundle(tmp_path / "copy", BenchConfig(engines=("aoti",), **FAST))


@pytest.mark.slow
def test_cli_writes_json_markdown_and_html_with_plots(
    aoti_bundle, native_runner, tmp_path: Path, capsys
) -> None:
    out, _, _ = aoti_bundle
    args = ["bench", str(out), "--engines", "ort,aoti,native", "--batch", "1,2", "--seq-len", "8"]
    args += ["--threads", "1", "--warmup", "1", "--repeats", "3", "--fidelity-texts", "8"]
    args += ["--runner", str(native_runner), "--out", str(tmp_path / "rep")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "speedup vs ort_fp32" in printed and "fidelity of each engine" in printed
    result = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert list(result["engines"]) == ["ort_fp32", "ort", "aoti", "native"]
    md = (tmp_path / "rep" / "bench.md").read_text()
    assert md.count("| 2 x 8 |") == 4
    page = (tmp_path / "rep" / "report.html").read_text()
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 2  # latency vs batch; fidelity vs speed
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    assert svgs[0].count("<polyline") == 4 and svgs[1].count("r='5'") == 3  # native has no fidelity


def _circles(svg: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"<circle cx='([\d.]+)' cy='([\d.]+)'", svg)]


def test_line_chart_places_points_on_log_axes() -> None:
    svg = line_chart({"a": [(1, 10.0), (4, 40.0)], "b": [(1, 1.0), (4, 2.0)]}, "t", "x", "y")
    (a1, a4, b1, b4) = _circles(svg)
    assert a1[0] == b1[0] < a4[0] == b4[0]  # same batch, same x; larger batch to the right
    assert a1[1] < b1[1] and a4[1] < a1[1]  # slower is higher (smaller SVG y)
    # log scale: 10 -> 40 spans the same height as 1 -> 4 would
    assert math.isclose(a1[1] - a4[1], (b1[1] - b4[1]) * math.log(4) / math.log(2), rel_tol=1e-3)
    assert line_chart({}, "t", "x", "y") == ""


def test_scatter_chart_ticks_resolve_close_values() -> None:
    svg = scatter_chart({"p": (1.0, 0.99990), "q": (2.0, 0.99995)}, "t", "x", "y")
    ET.fromstring(svg)
    labels = re.findall(r"text-anchor='end'>([\d.]+)</text>", svg)
    assert len(set(labels)) == len(labels) > 1  # no two ticks print alike (e.g. "1", "1")
    (p, q) = _circles(svg)
    assert p[0] < q[0] and q[1] < p[1]


def test_engine_selection_puts_the_baseline_first() -> None:
    import torch

    from compressor.app.bench import _engine_names

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    arts = {"onnx": "m.onnx", "aoti": "m.pt2"}
    assert _engine_names(BenchConfig(), arts, cpu) == (["ort_fp32", "ort", "aoti", "native"], "ort_fp32")
    assert _engine_names(BenchConfig(), arts, cuda)[1] == "torch_original"
    picked = BenchConfig(engines=("aoti", "ort", "aoti", "ort_fp32"), baseline="torch_original")
    assert _engine_names(picked, arts, cpu) == (
        ["torch_original", "aoti", "ort", "ort_fp32"],
        "torch_original",
    )
    # no baseline: a baseline engine named in --engines is just another engine
    none = BenchConfig(engines=("torch_original", "ort"), baseline=None)
    assert _engine_names(none, arts, cpu) == (["torch_original", "ort"], None)
    with pytest.raises(CompressorError, match="baseline 'ort' is not one of"):
        _engine_names(BenchConfig(baseline="ort"), arts, cpu)


@pytest.mark.slow
def test_onnx_files_are_timed_beside_ort_fp32_of_the_original(aoti_bundle, tiny_bert_dir, tmp_path) -> None:
    """The benchmarks' shared helper: every file and the fp32 baseline timed in one rotation,
    and the baseline is the original model (its outputs are the original's, not the bundle's)."""
    import numpy as np
    import torch

    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.app.timing import time_onnx_against_fp32
    from compressor.exporters.onnx.onnx import ort_session

    out, _, _ = aoti_bundle
    adapter = HFEncoderAdapter()
    original = adapter.load(str(tiny_bert_dir))
    stats = time_onnx_against_fp32(
        adapter, original, {"int8": out / "model.onnx"}, tmp_path, batch=3, seq_len=16, threads=1, warmup=1,
        repeats=4, baseline="fp32",
    )  # fmt: skip
    assert list(stats) == ["fp32", "int8"]
    for s in stats.values():
        assert 0 < s["median_ms"] <= s["p99_ms"]
        assert s["throughput_per_s"] == pytest.approx(3 * 1000 / s["median_ms"], rel=0.01)
    batch = adapter.tokenize(["a held-out sentence", "and another one"], 16)
    sess = ort_session(tmp_path / "plain.onnx", 1)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {k: batch[k].numpy() for k in names})[0]
    with torch.no_grad():
        want = adapter.forward(original, batch).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
