"""Timing in rotation: engines run in turns so that a noisy machine slows all alike.

``time_side_by_side`` rotates the candidates, ``block`` runs each per turn, and times all
but the first of each block (ONNX Runtime's worker threads spin for a while after a run;
the engine timed right after another would pay for it). ``time_onnx_against_fp32`` is the
benchmarks' shortcut: ONNX files against the original model's plain ONNX export in ORT fp32.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from compressor.adapters.base import BenchInputs, ModelAdapter, TimingInputs
from compressor.errors import CompressorError

log = logging.getLogger(__name__)

RunFn = Callable[[], Any]


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a ratio of 0.0205 stays 0.0205, not 0.021."""
    return float(f"{x:.{digits}g}")


def latency_stats(times_s: list[float], batch: int) -> dict[str, float]:
    ms = np.array(times_s) * 1000.0
    median = float(np.median(ms))
    return {
        "median_ms": round(median, 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "throughput_per_s": _sig(batch * 1000.0 / median),
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


def time_onnx_against_fp32(
    adapter: Any,
    original: nn.Module,
    files: Mapping[str, Path],
    work: Path,
    batch: int,
    seq_len: int,
    threads: int,
    warmup: int,
    repeats: int,
    baseline: str = "ort_fp32",
) -> dict[str, dict[str, float]]:
    """``latency_stats`` of each ONNX file in ``files`` and of ``baseline``, ORT fp32 of
    ``original``'s plain export (written into ``work``), timed side by side on ``batch``
    held-out inputs padded to ``seq_len`` (the ``adapter``'s ``bench_inputs``)."""
    from compressor.exporters.onnx.onnx import export_onnx, ort_session

    inputs = timing_inputs_of(adapter, "time_onnx_against_fp32")
    plain = adapter.export_spec(copy.deepcopy(original), inputs.example(), fused=False)
    export_onnx(plain.module, plain, work / "plain.onnx", 17)
    paths = {baseline: work / "plain.onnx", **files}
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    feed = {k: v.numpy() for k, v in inputs.timing(batch, seq_len).items()}
    runs = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    log.info("timing %d ONNX models side by side", len(runs))
    return {k: latency_stats(t, batch) for k, t in time_side_by_side(runs, warmup, repeats).items()}


def timing_inputs_of(adapter: ModelAdapter, who: str) -> TimingInputs:
    """The adapter's ``timing_inputs``, or the error that its exports cannot be timed."""
    inputs = adapter.timing_inputs()
    if inputs is None:
        raise CompressorError(f"{who}: the {adapter.name} adapter declares no inputs to time")
    return inputs


def bench_inputs_of(adapter: ModelAdapter, who: str) -> BenchInputs:
    """The adapter's ``bench_inputs``, or the error that its bundles cannot be benched."""
    inputs = adapter.bench_inputs()
    if inputs is None:
        raise CompressorError(f"{who}: bench times sentence-embedding bundles; this one uses {adapter.name}")
    return inputs
