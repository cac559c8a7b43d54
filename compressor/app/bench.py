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
import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.adapters.base import BenchInputs, ModelAdapter, group_metric_key
from compressor.app.engines import BASELINES, CODE_ENGINES, ENGINE_ARTIFACTS, Engine, EngineUnavailable
from compressor.app.timing import bench_inputs_of, latency_stats, time_side_by_side
from compressor.bundle import check_bundle, check_paths
from compressor.errors import CompressorError, DataError
from compressor.trust import Trust

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    engines: tuple[str, ...] | None = None  # None: every engine the bundle has (and the baseline)
    batch_sizes: tuple[int, ...] = (1, 32)
    seq_len: int = 128
    threads: int = 2
    warmup: int = 3
    repeats: int = 20
    decode_tokens: int = 32  # decoder LM bundles: tokens generated per timed turn (compressor.app.bench_lm)
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
    from compressor.app.engines import (
        aoti_engine,
        exported_program_engine,
        find_runner,
        native_engine,
        ort_engine,
        tensorrt_engine,
        torch_original_engine,
    )
    from compressor.exporters.onnx.onnx import export_onnx

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
    if name == "genai":
        raise EngineUnavailable("genai: times decoder LM bundles (prefill and decode), not this one")
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


def _manifest_and_trust(
    bundle: Path, cfg: BenchConfig, own_manifest: dict[str, Any] | None
) -> tuple[dict[str, Any], Trust]:
    """The manifest, its paths (and hashes, for a finished bundle) checked before any
    artifact is opened, and whether the bundle's code may load."""
    from compressor.trust import Signature, decide_trust

    if own_manifest is None:
        checked = check_bundle(bundle)  # before any artifact is opened
        return checked.manifest, decide_trust(bundle, checked.manifest_bytes, explicit=cfg.trust)
    check_paths(bundle, own_manifest)
    return own_manifest, Trust(
        True, "written by this compile", Signature("own", "not signed yet: being written")
    )


@dataclass
class _Loaded:
    """What the engines are timed against: the original model, its adapter and bench inputs."""

    recipe: Any
    adapter: ModelAdapter
    inputs: BenchInputs
    original: nn.Module
    spec: Any


def _load_engines(
    names: list[str],
    refused: Mapping[str, str],
    bundle: Path,
    manifest: Mapping[str, Any],
    cfg: BenchConfig,
    device: torch.device,
    run: _Loaded,
    tmp: Path,
    trust: Trust,
) -> tuple[dict[str, Engine], dict[str, dict[str, Any]]]:
    """Each engine that can run, and every engine's status (loaded, or skipped and why)."""
    engines: dict[str, Engine] = {}
    status: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in refused:
            status[name] = {"status": "skipped", "reason": f"skipped: {refused[name]}"}
            log.info("not loading %s: %s", name, refused[name])
            continue
        t0 = time.perf_counter()
        try:
            engine = _load_engine(
                name, bundle, manifest, cfg, device, run.original, run.adapter, run.spec, tmp, trust
            )
        except EngineUnavailable as e:
            if cfg.engines is not None:
                raise
            status[name] = {"status": "skipped", "reason": str(e)}
            log.info("skipping %s", e)
            continue
        engines[name] = engine
        status[name] = {"status": "ok", "label": engine.label, "load_s": round(time.perf_counter() - t0, 2)}
        status[name]["timed"] = "own process" if engine.measure else "rotated"
        status[name].update(engine.info)
    return engines, status


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

    cfg = cfg or BenchConfig()
    bundle = Path(bundle)
    manifest, trust = _manifest_and_trust(bundle, cfg, own_manifest)
    recipe = _manifest_recipe(manifest, bundle)
    compiled_with = manifest.get("model", {}).get("adapter", recipe.model.adapter)
    if compiled_with == "module":  # a Python nn.Module compiled in memory: no folder to reload it from
        raise CompressorError(f"{bundle}: bench times sentence-embedding bundles; this one uses module")
    adapter = make_adapter(recipe.model.adapter, recipe.model.source)
    device = torch.device(cfg.device)
    if adapter.autoregressive:  # prefill and decode per token in ONNX Runtime GenAI
        from compressor.app.bench_lm import bench_lm_bundle

        if device.type != "cpu":
            raise CompressorError(
                "bench: decoder LM bundles are timed on the CPU (ONNX Runtime GenAI); use --device cpu"
            )
        return bench_lm_bundle(bundle, manifest, recipe, adapter, cfg, trust)
    inputs = bench_inputs_of(adapter, str(bundle))  # refused before the model loads; fed after
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError("bench: --device cuda asked for and torch sees no CUDA GPU")
    names, baseline = _engine_names(cfg, manifest.get("artifacts", {}), device)
    refused = _refused_code_engines(names, cfg, trust)
    original = adapter.load(recipe.model.source)
    spec = adapter.export_spec(copy.deepcopy(original), inputs.example(), fused=False)
    run = _Loaded(recipe, adapter, inputs, original, spec)
    result: dict[str, Any] = {"device": str(device), "threads": cfg.threads, "seq_len": cfg.seq_len}
    result["trust"] = trust.to_dict()
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)  # the torch engines get the thread count ORT gets
    try:
        with tempfile.TemporaryDirectory(prefix="compressor-bench-") as tmp:
            engines, status = _load_engines(
                names, refused, bundle, manifest, cfg, device, run, Path(tmp), trust
            )
            if baseline is not None and baseline not in engines:
                raise CompressorError(
                    f"bench: the baseline {baseline} cannot run: {status[baseline]['reason']}"
                )
            result["baseline"] = baseline
            result["latency"] = _sweep(engines, cfg, inputs, baseline)
            if cfg.fidelity:
                _score(engines, status, cfg, run)
    finally:
        torch.set_num_threads(threads_before)
    result["engines"] = status
    return result


def _score(
    engines: Mapping[str, Engine], status: dict[str, dict[str, Any]], cfg: BenchConfig, run: _Loaded
) -> None:
    """Each engine's fidelity on the recipe's held-out samples, into its ``status``: for a text
    model the very held-out texts the compile judged (its domains and lengths, the user's own
    data included), else ``n`` held-out samples of the adapter's bench inputs."""
    data = run.recipe.data
    groups: dict[str, list[int]] = {}
    held_out = None
    if not cfg.fidelity_texts and run.adapter.serving_length() is not None:
        try:
            held_out = run.adapter.make_data(dataclasses.replace(data, train_samples=0), run.recipe.seed)
        except DataError as e:  # the recipe's own data is not on this machine
            log.warning("bench: %s; scoring on the default held-out text instead", e)
    if held_out is not None:
        batches = held_out.eval
        groups = {g: i for g, i in held_out.eval_groups.items() if g.startswith("domain=")}
    else:
        n = cfg.fidelity_texts or data.eval_samples
        max_length = data.max_length or run.adapter.serving_length() or 128
        batches = run.inputs.fidelity(n, run.recipe.seed, data.batch_size, max_length)
    texts = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    for name, fid in _fidelity(engines, run.original, run.adapter, run.inputs, batches, groups).items():
        status[name]["fidelity"] = None if fid is None else dict(fid, texts=texts)


def _fidelity(
    engines: Mapping[str, Engine],
    original: nn.Module,
    adapter: Any,
    inputs: BenchInputs,
    batches: list[Any],
    groups: Mapping[str, list[int]] | None = None,
) -> dict[str, dict[str, float] | None]:
    """Each engine's outputs on ``batches`` against the original model in torch (None for an
    engine that returns no outputs: the native runner), over all batches and per group
    (``metric@group`` keys, as the compile's metrics)."""
    with torch.no_grad():
        refs = [adapter.forward(original, b) for b in batches]
    ref = torch.cat(refs)
    scores: dict[str, dict[str, float] | None] = {}
    for name, engine in engines.items():
        if engine.measure is not None:
            scores[name] = None
            continue
        outs = [engine.to_tensor(engine.bind(b)()) for b in batches]
        score = {k: round(v, 6) for k, v in inputs.score(torch.cat(outs), ref).items()}
        for group, idx in (groups or {}).items():
            part = inputs.score(torch.cat([outs[i] for i in idx]), torch.cat([refs[i] for i in idx]))
            score.update({group_metric_key(k, group): round(v, 6) for k, v in part.items()})
        scores[name] = score
    return scores


def _sweep(
    engines: Mapping[str, Engine],
    cfg: BenchConfig,
    inputs: BenchInputs,
    baseline: str | None,
) -> list[dict[str, Any]]:
    rows = []
    for bs in cfg.batch_sizes:
        batch = inputs.timing(bs, cfg.seq_len)
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
