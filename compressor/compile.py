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
from pathlib import Path
from typing import Any

import torch

from compressor.adapters import make_adapter
from compressor.adapters.base import ModelAdapter
from compressor.bundle import BundleWriter, read_manifest
from compressor.errors import PassError
from compressor.exporters import EXPORTERS
from compressor.exporters.base import ExportContext
from compressor.output_paths import Protected, check_work_dir, kept_work_dir, temp_work_dir
from compressor.passes import PASSES
from compressor.pipeline import Pass, PassContext, Pipeline
from compressor.progress import ProgressSetting
from compressor.recipe import Recipe
from compressor.report import render_html, render_markdown
from compressor.targets import get_target

log = logging.getLogger(__name__)


def plan(
    recipe: Recipe, adapter: ModelAdapter | None = None
) -> tuple[Any, ModelAdapter, torch.nn.Module, list[Pass], list[Any]]:
    """Load the model and check the whole plan; no pass has run when this returns."""
    target = get_target(recipe.target)
    adapter = adapter or make_adapter(recipe.model.adapter, recipe.model.source)
    model = adapter.load(recipe.model.source)
    passes = [PASSES[p.name](p.config) for p in recipe.passes]
    exporters = [EXPORTERS[e.format](e.config) for e in recipe.exports]
    Pipeline(passes, instruments=[]).check(model, target, adapter)
    for i, e in enumerate(exporters):
        e.check(target)
        e.check_recipe(recipe, i)
    return target, adapter, model, passes, exporters


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

    def stage(msg: str) -> None:
        log.info(msg)
        if on_stage:
            on_stage(msg)

    rank = int(os.environ.get("RANK", "0"))
    worker = tempfile.TemporaryDirectory(prefix=f"compressor-rank{rank}-") if rank != 0 else None
    if worker is not None:  # torchrun rank > 0: same passes, bundle thrown away
        out_dir, overwrite = Path(worker.name) / "bundle", True
    torch.manual_seed(recipe.seed)
    if work_dir is not None:
        check_work_dir(work_dir, out_dir)
    # The output paths are checked (and --out locked) before the model loads: no work is lost
    # to a refusal, and nothing is written for a path that is refused.
    with (
        BundleWriter(out_dir, overwrite, _protected(recipe, work_dir), report=stage) as bundle,
        _work_dir(work_dir, report=stage) as work,
    ):
        stage(f"planning {recipe.name} for target {recipe.target}")
        target, adapter, model, passes, exporters = plan(recipe, adapter)
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        stage("building calibration / training / held-out data")
        data = adapter.make_data(recipe.data, recipe.seed)
        pipeline = Pipeline(
            passes,
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
            work_dir=Path(work),  # scratch space for passes; never part of the bundle
            progress=progress,
        )
        model = pipeline.run(model, ctx)
        final = pipeline.results[-1].metrics
        floor = recipe.evaluation.min_mean_cosine
        if floor is not None and final.get("mean_cosine", 1.0) < floor:
            raise PassError(
                f"final mean cosine {final['mean_cosine']:.5f} is below evaluation.min_mean_cosine {floor}; "
                "no bundle was written"
            )
        bundle.manifest.update(
            {
                "name": recipe.name,
                "recipe": recipe.to_dict(),
                "target": {"name": target.name, "arch": target.arch, "device": target.device},
                "model": {"source": recipe.model.source, "adapter": adapter.name},
                "data": data.info,
                "passes": [r.to_dict() for r in pipeline.results],
                "verification": {},
            }
        )
        assert bundle.path is not None
        ectx = ExportContext(target=target, adapter=adapter, data=data, reference_model=model, recipe=recipe)
        for e in exporters:
            stage(f"export {e.name} (+ verification in ONNX Runtime)")
            res = e.export(model, ectx, bundle.path)
            bundle.add_artifacts(res.artifacts)
            bundle.manifest["verification"].update(res.verification)
        from compressor.adapters.hf_encoder import HFEncoderAdapter

        timed = isinstance(adapter, HFEncoderAdapter)  # bench knows how to feed sentence encoders
        # The benchmark after export times ONNX Runtime on this machine's CPU: the target's own
        # figure only when the target is the CPU. For a GPU target it would be a number about the
        # wrong hardware, so it is skipped and the manifest says where to time the bundle instead.
        skipped = None
        if recipe.evaluation.run_bench and timed and target.device != "cpu":
            skipped = (
                f"target {target.name} is a GPU and this compile times ONNX Runtime on this host's CPU; "
                f"time the bundle on the {target.name}: compressor bench BUNDLE --device cuda"
            )
            bundle.manifest["benchmark_skipped"] = skipped
        if (
            recipe.evaluation.run_bench
            and timed
            and skipped is None
            and worker is None
            and "onnx" in bundle.manifest["artifacts"]
        ):
            from compressor.bench import BenchConfig, bench_bundle

            b = recipe.evaluation.bench
            stage(f"benchmark: batch {list(b.batch_sizes)} x {b.seq_len}, {b.threads} threads, vs ORT fp32")
            cfg = BenchConfig(("ort",), b.batch_sizes, b.seq_len, b.threads, b.warmup, b.repeats)
            bundle.manifest["benchmark"] = bench_bundle(bundle.path, cfg, own_manifest=bundle.manifest)
        bundle.write_text("report.md", render_markdown(bundle.manifest))
        bundle.write_text("report.html", render_html(bundle.manifest))
    manifest = read_manifest(out_dir)
    if worker is not None:
        worker.cleanup()
    return manifest


def _work_dir(path: Path | None, report: Callable[[str], None]) -> contextlib.AbstractContextManager[Path]:
    """The passes' scratch dir: ``path`` (created, kept) or a marked temporary one (removed);
    a temporary one that a killed compile left is removed first."""
    if path is None:
        return temp_work_dir(report)
    return kept_work_dir(Path(path))


def _protected(recipe: Recipe, work_dir: Path | None) -> list[Protected]:
    """What ``--overwrite`` must never replace besides the root, home and current directory."""
    out = [Protected("the model's source folder", Path(recipe.model.source), inside_too=True)]
    if work_dir is not None:
        out.append(Protected("the work dir", Path(work_dir)))
    return [p for p in out if os.path.lexists(p.path)]
