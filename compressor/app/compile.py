"""`compressor compile`: recipe → passes → exporters → verified bundle (→ benchmark).

Every plan check runs before any work: the target, each pass's legality and layer
patterns, each exporter. Only then is data built and the pipeline run. The bundle is
written atomically (``compressor.bundle``): a failure anywhere, including a fidelity
floor the recipe sets, leaves no bundle behind.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.adapters import make_adapter
from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.app.report import render_html, render_markdown
from compressor.bundle import BundleWriter
from compressor.bundle_assets import write_runtime_assets
from compressor.errors import CompressorError
from compressor.exporters import EXPORTERS
from compressor.exporters.base import ExportContext, Exporter
from compressor.fidelity import check_evaluation, fidelity_gate
from compressor.modules import batch_invariance
from compressor.output_paths import Protected, check_work_dir, kept_work_dir, temp_work_dir
from compressor.passes import PASSES
from compressor.pipeline import Pass, PassContext, PassResult, Pipeline
from compressor.planning import check_plan
from compressor.progress import ProgressSetting
from compressor.recipe import Recipe
from compressor.targets import Target, get_target

log = logging.getLogger(__name__)


def plan(
    recipe: Recipe, adapter: ModelAdapter | None = None, model: nn.Module | None = None
) -> tuple[Target, ModelAdapter, nn.Module, list[Pass], list[Exporter]]:
    """Load the model (or take ``model``, used as it is) and check the whole plan on it; no
    pass has run when this returns. ``adapter`` replaces the one the recipe names."""
    target = get_target(recipe.target)
    adapter = adapter or make_adapter(recipe.model.adapter, recipe.model.source)
    check_evaluation(recipe.evaluation, adapter)
    if model is None:
        model = adapter.load(recipe.model.source)
    passes = [PASSES[p.name](p.config) for p in recipe.passes]
    exporters = [EXPORTERS[e.format](e.config) for e in recipe.exports]
    check_plan(target, adapter, model, passes, exporters)
    return target, adapter, model, passes, exporters


@dataclass
class Compressed:
    """A recipe applied to a model in memory: what ``export_bundle`` writes.

    ``results`` is the pass history (the original model first, then one entry per pass),
    ``teacher`` what the metrics compare against (a frozen copy of the model before any
    pass unless the caller gave one), ``data`` the splits used."""

    recipe: Recipe
    target: Target
    adapter: ModelAdapter
    model: nn.Module
    teacher: nn.Module
    data: DataSplits
    exporters: list[Exporter]
    results: list[PassResult]

    @property
    def metrics(self) -> dict[str, Any]:
        """The final model's metrics on the held-out data (the last pass's; empty when the
        passes ran unmeasured)."""
        return dict(self.results[-1].metrics)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no parameter that trains: a teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def apply_recipe(
    recipe: Recipe,
    adapter: ModelAdapter | None,
    work_dir: Path,
    progress: ProgressSetting = False,
    stage: Callable[[str], None] = log.info,
    *,
    model: nn.Module | None = None,
    data: DataSplits | None = None,
    teacher: nn.Module | None = None,
    measure: bool = True,
) -> Compressed:
    """Plan ``recipe`` (every check before any work), build its data, run its passes in
    ``work_dir`` and gate on the recipe's fidelity floors; nothing is written to a bundle.

    What the caller already holds replaces what a compile builds: ``model`` instead of the
    adapter loading the recipe's (the plan is checked on it, and the passes change it in
    place), ``data`` instead of ``adapter.make_data``, ``teacher`` (the caller's, not
    copied) instead of a frozen copy of the model. ``measure`` False runs the passes without
    measuring the model before and after each (the results then carry no metrics), and is
    refused with a recipe that sets a fidelity floor, which could not be judged."""
    ev = recipe.evaluation
    floors = [o for o in ("min_mean_cosine", "headline_limit") if getattr(ev, o) is not None]
    if not measure and floors:
        raise CompressorError(
            f"{recipe.source}: evaluation.{floors[0]} is a fidelity floor, judged on the measured final "
            "model; measure the passes (measure=True) or drop the floor"
        )
    torch.manual_seed(recipe.seed)
    stage(f"planning {recipe.name} for target {recipe.target}")
    target, adapter, model, passes, exporters = plan(recipe, adapter, model)
    if teacher is None:
        teacher = frozen_copy(model)
    if data is None:
        stage("building calibration / training / held-out data")
        data = adapter.make_data(recipe.data, recipe.seed)
    pipeline = Pipeline(
        passes,
        instruments=None if measure else [],
        on_pass_start=lambda i, p: stage(f"pass {i + 1}/{len(passes)}: {p.name}"),
        on_measure_start=lambda p: stage(
            f"measuring {'the original model' if p is None else 'after ' + p.name} on the held-out data"
        ),
    )
    ctx = PassContext(
        target=target,
        adapter=adapter,
        teacher=teacher,
        data=data,
        seed=recipe.seed,
        work_dir=Path(work_dir),  # scratch space for passes; never part of the bundle
        progress=progress,
    )
    model = pipeline.run(model, ctx)
    if measure:
        fidelity_gate(ev, adapter, pipeline.results[-1].metrics)
    return Compressed(recipe, target, adapter, model, teacher, data, exporters, list(pipeline.results))


def export_bundle(
    c: Compressed, bundle: BundleWriter, stage: Callable[[str], None] = log.info, bench: bool = True
) -> None:
    """Fill the open ``bundle``: the manifest, every export with its verification, the
    benchmark the recipe asks for (unless ``bench`` is False) and the reports. The writer
    hashes, signs and renames it into place when its ``with`` block ends."""
    recipe, target, m = c.recipe, c.target, bundle.manifest
    m.name = recipe.name
    m.recipe = recipe.to_dict()
    m.target = {"name": target.name, "arch": target.arch, "device": target.device}
    m.model = {"source": recipe.model.source, "adapter": c.adapter.name}
    m.data = c.data.info
    m.batch_invariance = batch_invariance(c.model)
    m.passes = [r.to_dict() for r in c.results]
    m.verification = {}
    assert bundle.path is not None
    for e in c.exporters:
        stage(f"export {e.name} (+ verification in ONNX Runtime)")
        ectx = ExportContext(
            target=target,
            adapter=c.adapter,
            data=c.data,
            reference_model=c.model,
            batch_sizes=recipe.evaluation.bench.batch_sizes,
            written=dict(m.artifacts),
        )
        res = e.export(c.model, ectx, bundle.path)
        bundle.add_artifacts(res.artifacts)
        m.verification.update(res.verification)
    write_runtime_assets(c.adapter, c.model, bundle)  # its tokenizer, for compressor.runtime
    _bench_after_export(c, bundle, stage, bench)
    bundle.write_text("report.md", render_markdown(m.to_dict()))
    bundle.write_text("report.html", render_html(m.to_dict()))


def _bench_after_export(
    c: Compressed, bundle: BundleWriter, stage: Callable[[str], None], bench: bool
) -> None:
    """The benchmark the recipe asks for, when the adapter declares bench inputs. It times ONNX
    Runtime on this machine's CPU: the target's own figure only when the target is the CPU. For
    a GPU target it would be a number about the wrong hardware, so it is skipped and the
    manifest says where to time the bundle instead."""
    recipe, target, m = c.recipe, c.target, bundle.manifest
    if not recipe.evaluation.run_bench or c.adapter.bench_inputs() is None:
        return
    if target.device != "cpu":
        m.benchmark_skipped = (
            f"target {target.name} is a GPU and this compile times ONNX Runtime on this host's CPU; "
            f"time the bundle on the {target.name}: compressor bench BUNDLE --device cuda"
        )
        return
    if not bench or "onnx" not in m.artifacts:
        return
    from compressor.app.bench import BenchConfig, bench_bundle

    assert bundle.path is not None
    b = recipe.evaluation.bench
    stage(f"benchmark: batch {list(b.batch_sizes)} x {b.seq_len}, {b.threads} threads, vs ORT fp32")
    cfg = BenchConfig(("ort",), b.batch_sizes, b.seq_len, b.threads, b.warmup, b.repeats)
    m.benchmark = bench_bundle(bundle.path, cfg, own_manifest=m.to_dict())


def compile_recipe(
    recipe: Recipe,
    out_dir: Path,
    overwrite: bool = False,
    progress: ProgressSetting = False,
    on_stage: Callable[[str], None] | None = None,
    adapter: ModelAdapter | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``recipe`` and write its bundle to ``out_dir``; returns the manifest.

    ``adapter`` replaces the recipe's model: e.g. a ``ModuleAdapter`` around any
    ``nn.Module`` and its data, from Python. ``work_dir`` is the passes' scratch space
    (default: a temporary directory removed afterwards); a kept one lets a rerun resume
    (``distill`` with ``checkpoint_every``). Under ``torchrun`` every rank runs the
    passes (distillation trains data-parallel) and only rank 0 writes the bundle."""
    stage = _stage_reporter(on_stage)
    rank = int(os.environ.get("RANK", "0"))
    worker = tempfile.TemporaryDirectory(prefix=f"compressor-rank{rank}-") if rank != 0 else None
    if worker is not None:  # torchrun rank > 0: same passes, bundle thrown away
        out_dir, overwrite = Path(worker.name) / "bundle", True
    if work_dir is not None:
        check_work_dir(work_dir, out_dir)
    # The output paths are checked (and --out locked) before the model loads: no work is lost
    # to a refusal, and nothing is written for a path that is refused.
    with (
        BundleWriter(out_dir, overwrite, protected_paths(recipe, work_dir), report=stage) as bundle,
        work_dir_for(work_dir, report=stage) as work,
    ):
        compressed = apply_recipe(recipe, adapter, work, progress, stage)
        export_bundle(compressed, bundle, stage, bench=worker is None)
    assert bundle.written is not None
    if worker is not None:
        worker.cleanup()
    return bundle.written


def _stage_reporter(on_stage: Callable[[str], None] | None) -> Callable[[str], None]:
    """Each stage to the log and to ``on_stage`` (the CLI's progress line)."""

    def stage(msg: str) -> None:
        log.info(msg)
        if on_stage:
            on_stage(msg)

    return stage


def work_dir_for(path: Path | None, report: Callable[[str], None]) -> contextlib.AbstractContextManager[Path]:
    """The passes' scratch dir: ``path`` (created, kept) or a marked temporary one (removed);
    a temporary one that a killed compile left is removed first."""
    if path is None:
        return temp_work_dir(report)
    return kept_work_dir(Path(path))


def protected_paths(recipe: Recipe, work_dir: Path | None) -> list[Protected]:
    """What ``--overwrite`` must never replace besides the root, home and current directory."""
    out = [Protected("the model's source folder", Path(recipe.model.source), inside_too=True)]
    if work_dir is not None:
        out.append(Protected("the work dir", Path(work_dir)))
    return [p for p in out if os.path.lexists(p.path)]
