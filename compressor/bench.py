"""Latency and fidelity of a bundle on every engine it can run on, side by side.

Speed is a ratio measured in one run: the bundle's engines and the baseline (by default
the original model exported as-is to ONNX and run in ONNX Runtime fp32, what a user gets
without us; on CUDA the original in torch eager fp16) are timed in rotation, so that a
noisy machine slows all alike. Each turn runs one engine ``block`` times in a row and
drops the first: ONNX Runtime's worker threads spin for a while after a run, and without
that the engine timed right after another one pays for the other's spinning (seen here:
batch-1 latencies off by 1.5x). The native runner is the exception: a C++ process that
times itself, run after each batch size's rotation (marked ``"timed": "own process"``).
Inputs are real held-out sentences padded to the asked length; fidelity is each engine's
output against the original model in torch on held-out texts.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.bundle import check_bundle, check_paths
from compressor.engines import BASELINES, CODE_ENGINES, ENGINE_ARTIFACTS, Engine, EngineUnavailable
from compressor.errors import CompressorError
from compressor.trust import Trust

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
    ``original``'s plain transformers export (written into ``work``), timed side by side on
    ``batch`` held-out sentences padded to ``seq_len`` (an encoder ``adapter``)."""
    from compressor.data import sample, stdlib_docstring_splits
    from compressor.exporters.onnx import export_onnx, ort_session

    held_out = stdlib_docstring_splits().eval
    plain = adapter.export_spec(
        copy.deepcopy(original), adapter.tokenize(sample(held_out, 2, 0), 16), fused=False
    )
    export_onnx(plain.module, plain, work / "plain.onnx", 17)
    paths = {baseline: work / "plain.onnx", **files}
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    feed = {
        k: v.numpy()
        for k, v in adapter.tokenize(sample(held_out, batch, 1), seq_len, pad_to_max=True).items()
    }
    runs = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    log.info("timing %d ONNX models side by side", len(runs))
    return {k: latency_stats(t, batch) for k, t in time_side_by_side(runs, warmup, repeats).items()}


@dataclass
class BenchConfig:
    engines: tuple[str, ...] | None = None  # None: every engine the bundle has (and the baseline)
    batch_sizes: tuple[int, ...] = (1, 32)
    seq_len: int = 128
    threads: int = 2
    warmup: int = 3
    repeats: int = 20
    device: str = "cpu"
    baseline: str | None = "auto"  # auto: ort_fp32 on cpu, torch_original on cuda; None: no baseline
    fidelity: bool = True
    fidelity_texts: int = 0  # 0: the recipe's eval_samples
    runner: Path | None = None  # compressor-run; None: built into the user cache on first use
    trust: bool = False  # the user vouches for the bundle: its code-bearing engines may load


def _engine_names(
    cfg: BenchConfig, artifacts: Mapping[str, str], device: torch.device
) -> tuple[list[str], str | None]:
    """The engines to run, in report order (the baseline first), and the baseline's name."""
    baseline = cfg.baseline
    if baseline == "auto":
        baseline = "torch_original" if device.type == "cuda" else "ort_fp32"
    if baseline is not None and baseline not in BASELINES:
        raise CompressorError(f"bench: baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    if cfg.engines is None:
        names = [n for n, art in ENGINE_ARTIFACTS.items() if art is not None and art in artifacts]
    else:
        unknown = [n for n in cfg.engines if n not in ENGINE_ARTIFACTS]
        if unknown:
            raise CompressorError(
                f"bench: unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINE_ARTIFACTS)}"
            )
        names = list(dict.fromkeys(cfg.engines))
    if baseline is not None:
        names = [baseline] + [n for n in names if n != baseline]
    return names, baseline


def _load_engine(
    name: str,
    bundle: Path,
    manifest: Mapping[str, Any],
    cfg: BenchConfig,
    device: torch.device,
    original: nn.Module,
    adapter: Any,
    spec: Any,
    tmp: Path,
    trust: Trust,
) -> Engine:
    from compressor.engines import (
        aoti_engine,
        exported_program_engine,
        find_runner,
        native_engine,
        ort_engine,
        tensorrt_engine,
        torch_original_engine,
    )
    from compressor.exporters.onnx import export_onnx

    artifacts = manifest.get("artifacts", {})
    if name == "ort_fp32":
        base_path = tmp / "baseline_fp32.onnx"
        export_onnx(spec.module, spec, base_path, 17)
        return ort_engine(
            name, "original model, ONNX Runtime fp32 (plain export)", base_path, cfg.threads, device
        )
    if name == "torch_original":
        return torch_original_engine(original, adapter.forward, spec.input_names, device)
    art = ENGINE_ARTIFACTS[name]
    if art is None or art not in artifacts:
        raise EngineUnavailable(f"{name}: the bundle has no artifacts.{art} (add the export to the recipe)")
    path = bundle / artifacts[art]
    names = spec.input_names
    if name == "ort":
        return ort_engine(name, "bundle, ONNX Runtime", path, cfg.threads, device)
    if name == "ort_qdq":
        return ort_engine(name, "bundle Q/DQ ONNX, ONNX Runtime", path, cfg.threads, device)
    if name in CODE_ENGINES and not trust.trusted:  # bench_bundle skips these; never load one anyway
        raise CompressorError(f"{name}: {trust.refusal(CODE_ENGINES[name])}")
    captured_on = _captured_on(manifest, art)
    if name in ("torch_eager", "torch_compile"):
        return exported_program_engine(path, names, device, captured_on, compiled=name == "torch_compile")
    if name == "aoti":
        return aoti_engine(path, names, device, captured_on)
    if name == "native":
        if device.type != "cpu":
            raise EngineUnavailable("native: compressor-run feeds CPU tensors; bench it with --device cpu")
        return native_engine(find_runner(cfg.runner), path, names, cfg.threads)
    assert name == "tensorrt"
    return tensorrt_engine(path, names, device)


def _captured_on(manifest: Mapping[str, Any], art: str) -> str:
    """The device the exporter captured ``art`` on (its verification record), default cpu."""
    verification = manifest.get("verification")
    record = verification.get(art) if isinstance(verification, dict) else None
    device = record.get("device", "cpu") if isinstance(record, dict) else "cpu"
    if device not in ("cpu", "cuda") and not (isinstance(device, str) and device.startswith("cuda:")):
        raise CompressorError(f"manifest.json: verification.{art}.device: {device!r} is not cpu or cuda")
    return str(device)


def _manifest_recipe(manifest: Mapping[str, Any], bundle: Path) -> Any:
    """The recipe the bundle was compiled from (bench loads its original model), or one line."""
    from compressor.recipe import parse_recipe

    raw = manifest.get("recipe")
    where = f"{bundle}/manifest.json: recipe"
    if not isinstance(raw, dict):
        got = "missing" if raw is None else f"a JSON {type(raw).__name__}"
        raise CompressorError(
            f"{where}: {got}, not the recipe object bench needs to load the original model; recompile the bundle"
        )
    return parse_recipe(raw, where)


def _refused_code_engines(names: list[str], cfg: BenchConfig, trust: Trust) -> dict[str, str]:
    """The engines that would load code from an untrusted bundle, with the reason; an error
    when the user named one with ``--engines``."""
    if trust.trusted:
        return {}
    refused = {n: trust.refusal(CODE_ENGINES[n]) for n in names if n in CODE_ENGINES}
    if cfg.engines is not None and refused:
        name, why = next(iter(refused.items()))
        raise CompressorError(f"bench: --engines {name}: {why}")
    return refused


def bench_bundle(
    bundle: Path, cfg: BenchConfig | None = None, own_manifest: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Time the bundle on each engine (and the baseline), batch by batch, and score each
    engine's outputs against the original model. Engines that cannot run are listed with
    the reason when they were picked automatically, and are an error when asked for.

    The bundle's paths and hashes are checked first (``check_bundle``), and engines that load
    code from it run only on a trusted bundle (``compressor.trust``: signed by this machine's
    key, or ``cfg.trust``); on an untrusted one they are skipped with the reason.
    ``own_manifest`` is for the compile benching the bundle it is writing (not yet hashed or
    signed): its paths are still checked, and it is trusted as this process's own work."""
    from compressor.adapters import make_adapter
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.data import sample, stdlib_docstring_splits
    from compressor.trust import Signature, decide_trust

    cfg = cfg or BenchConfig()
    bundle = Path(bundle)
    if own_manifest is None:
        checked = check_bundle(bundle)  # before any artifact is opened
        manifest = checked.manifest
        trust = decide_trust(bundle, checked.manifest_bytes, explicit=cfg.trust)
    else:
        manifest = own_manifest
        check_paths(bundle, manifest)
        trust = Trust(True, "written by this compile", Signature("own", "not signed yet: being written"))
    recipe = _manifest_recipe(manifest, bundle)
    adapter = make_adapter(recipe.model.adapter, recipe.model.source)
    if not isinstance(adapter, HFEncoderAdapter):
        raise CompressorError(
            f"{bundle}: bench times sentence-embedding bundles; this one uses {adapter.name}"
        )
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError("bench: --device cuda asked for and torch sees no CUDA GPU")
    names, baseline = _engine_names(cfg, manifest.get("artifacts", {}), device)
    refused = _refused_code_engines(names, cfg, trust)
    original = adapter.load(recipe.model.source)
    held_out = stdlib_docstring_splits().eval
    example = adapter.tokenize(sample(held_out, 2, 0), 16)
    spec = adapter.export_spec(copy.deepcopy(original), example, fused=False)
    engines: dict[str, Engine] = {}
    status: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {"device": str(device), "threads": cfg.threads, "seq_len": cfg.seq_len}
    result["trust"] = trust.to_dict()
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)  # the torch engines get the thread count ORT gets
    try:
        with tempfile.TemporaryDirectory(prefix="compressor-bench-") as tmp:
            for name in names:
                if name in refused:
                    status[name] = {"status": "skipped", "reason": f"skipped: {refused[name]}"}
                    log.info("not loading %s: %s", name, refused[name])
                    continue
                t0 = time.perf_counter()
                try:
                    engines[name] = _load_engine(
                        name, bundle, manifest, cfg, device, original, adapter, spec, Path(tmp), trust
                    )
                except EngineUnavailable as e:
                    if cfg.engines is not None:
                        raise
                    status[name] = {"status": "skipped", "reason": str(e)}
                    log.info("skipping %s", e)
                    continue
                e_ = engines[name]
                status[name] = {
                    "status": "ok",
                    "label": e_.label,
                    "load_s": round(time.perf_counter() - t0, 2),
                }
                status[name]["timed"] = "own process" if e_.measure else "rotated"
                status[name].update(e_.info)
            if baseline is not None and baseline not in engines:
                raise CompressorError(
                    f"bench: the baseline {baseline} cannot run: {status[baseline]['reason']}"
                )
            result["baseline"] = baseline
            result["latency"] = _sweep(engines, cfg, adapter, held_out, baseline)
            if cfg.fidelity:
                texts = sample(held_out, cfg.fidelity_texts or recipe.data.eval_samples, recipe.seed)
                batches = adapter.batches(texts, recipe.data.batch_size, recipe.data.max_length)
                for name, fid in _fidelity(engines, original, adapter, batches).items():
                    status[name]["fidelity"] = None if fid is None else dict(fid, texts=len(texts))
    finally:
        torch.set_num_threads(threads_before)
    result["engines"] = status
    return result


def _fidelity(
    engines: Mapping[str, Engine], original: nn.Module, adapter: Any, batches: list[Any]
) -> dict[str, dict[str, float] | None]:
    """Each engine's outputs on ``batches`` against the original model in torch (None for an
    engine that returns no outputs: the native runner)."""
    from compressor.adapters.hf_encoder import embedding_fidelity

    with torch.no_grad():
        ref = torch.cat([adapter.forward(original, b) for b in batches])
    scores: dict[str, dict[str, float] | None] = {}
    for name, engine in engines.items():
        if engine.measure is not None:
            scores[name] = None
            continue
        out = torch.cat([engine.to_tensor(engine.bind(b)()) for b in batches])
        scores[name] = {k: round(v, 6) for k, v in embedding_fidelity(out, ref).items()}
    return scores


def _sweep(
    engines: Mapping[str, Engine],
    cfg: BenchConfig,
    adapter: Any,
    held_out: tuple[str, ...],
    baseline: str | None,
) -> list[dict[str, Any]]:
    from compressor.data import sample

    rows = []
    for bs in cfg.batch_sizes:
        batch = adapter.tokenize(sample(held_out, bs, 1), cfg.seq_len, pad_to_max=True)
        rotated = {n: e.bind(batch) for n, e in engines.items() if e.measure is None}
        times = time_side_by_side(rotated, cfg.warmup, cfg.repeats)
        stats = {n: latency_stats(t, bs) for n, t in times.items()}
        for n, e in engines.items():
            if e.measure is not None:
                stats[n] = e.measure(batch, cfg.warmup, cfg.repeats)
        if baseline is not None:
            for s in stats.values():
                s[f"speedup_vs_{baseline}"] = round(stats[baseline]["median_ms"] / s["median_ms"], 3)
        rows.append({"batch": bs, "seq_len": cfg.seq_len, "engines": stats})
        log.info("batch %d: %s", bs, {n: s["median_ms"] for n, s in stats.items()})
    return rows
