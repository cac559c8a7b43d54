"""Latency and fidelity of a bundle, measured side by side with the baseline.

Speed is a ratio measured in one run: the bundle's engine and the baseline (the
original model exported as-is to ONNX and run in ONNX Runtime fp32, what a user gets
without us) are timed in rotation, so that a noisy machine slows both alike. Each turn
runs one engine ``block`` times in a row and drops the first: ONNX Runtime's worker
threads spin for a while after a run, and without that the engine timed right after
another one pays for the other's spinning (seen here: batch-1 latencies off by 1.5x).
Inputs are real held-out sentences padded to the asked length.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.bundle import read_manifest
from compressor.errors import CompressorError

log = logging.getLogger(__name__)

RunFn = Callable[[], Any]


def latency_stats(times_s: list[float], batch: int) -> dict[str, float]:
    ms = np.array(times_s) * 1000.0
    median = float(np.median(ms))
    return {
        "median_ms": round(median, 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "throughput_per_s": round(batch * 1000.0 / median, 2),
        "repeats": len(ms),
    }


def time_side_by_side(
    runs: Mapping[str, RunFn], warmup: int, repeats: int, block: int = 3
) -> dict[str, list[float]]:
    """Rotate the candidates, ``block`` runs each per turn, timing all but the first of each
    block, until each has ``repeats`` timed runs; returns seconds per timed run."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    per_turn = max(1, block - 1)
    while min(len(t) for t in times.values()) < repeats:
        for name, fn in runs.items():
            fn()  # absorbs the previous engine's spinning threads
            for _ in range(min(per_turn, repeats - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def bench_bundle(
    bundle: Path,
    batch_sizes: tuple[int, ...] = (1, 32),
    seq_len: int = 128,
    threads: int = 2,
    warmup: int = 3,
    repeats: int = 20,
    baseline: bool = True,
    fidelity: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Time the bundle's ONNX (and the fp32 baseline) and score it against the original model."""
    from compressor.adapters import make_adapter
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.data import sample, stdlib_docstring_splits
    from compressor.exporters.onnx import export_onnx, ort_session
    from compressor.recipe import parse_recipe

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    onnx_rel = manifest.get("artifacts", {}).get("onnx")
    if not onnx_rel:
        raise CompressorError(f"{bundle}: the manifest lists no artifacts.onnx to benchmark")
    recipe = parse_recipe(manifest["recipe"], f"{bundle}/manifest.json:recipe")
    adapter = make_adapter(recipe.model.adapter, recipe.model.source)
    if not isinstance(adapter, HFEncoderAdapter):
        raise CompressorError(
            f"{bundle}: bench times sentence-embedding bundles; this one uses {adapter.name}"
        )
    original = adapter.load(recipe.model.source)
    held_out = stdlib_docstring_splits().eval
    sessions = {"bundle": ort_session(bundle / onnx_rel, threads)}
    with tempfile.TemporaryDirectory() as tmp:
        if baseline:
            example = adapter.tokenize(sample(held_out, 2, 0), 16)
            spec = adapter.export_spec(copy.deepcopy(original), example, fused=False)
            base_path = Path(tmp) / "baseline_fp32.onnx"
            export_onnx(spec.module, spec, base_path, 17)
            sessions["ort_fp32"] = ort_session(base_path, threads)
        rows = []
        for bs in batch_sizes:
            feed_t = adapter.tokenize(sample(held_out, bs, 1), seq_len, pad_to_max=True)
            feed = {k: v.numpy() for k, v in feed_t.items()}
            runs = {name: (lambda s=s, f=feed: s.run(None, f)) for name, s in sessions.items()}
            times = time_side_by_side(runs, warmup, repeats)
            row: dict[str, Any] = {"batch": bs, "seq_len": seq_len}
            for name, t in times.items():
                row[name] = latency_stats(t, bs)
            if baseline:
                row["speedup_vs_ort_fp32"] = round(
                    row["ort_fp32"]["median_ms"] / row["bundle"]["median_ms"], 3
                )
            rows.append(row)
            log.info("batch %d: %s", bs, row)
    result: dict[str, Any] = {"threads": threads, "engine": "onnxruntime-cpu", "latency": rows}
    if fidelity:
        from compressor.adapters.hf_encoder import embedding_fidelity

        texts = sample(held_out, recipe.data.eval_samples, recipe.seed)
        batches = adapter.batches(texts, recipe.data.batch_size, recipe.data.max_length)
        sess = sessions["bundle"]
        with torch.no_grad():
            ref = torch.cat([adapter.forward(original, b) for b in batches])
        out = torch.cat(
            [torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in b.items()})[0]) for b in batches]
        )
        result["fidelity"] = {k: round(v, 6) for k, v in embedding_fidelity(out, ref).items()}
        result["fidelity"]["texts"] = len(texts)
    return result
