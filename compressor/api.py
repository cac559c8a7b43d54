"""The Python API: load a recipe, apply it to a model in memory, export a bundle, bench it.

The CLI (``compressor.app.cli``), the benchmarks and user code all go through these four
functions, and ``compile_recipe`` is their composition with the output paths checked first:

    recipe = load_recipe("minilm-cpu-int8")
    c = compress(recipe)                         # or compress(recipe, model=net, data=splits)
    print(c.metrics["mean_cosine"])              # the final model, still in memory: c.model
    manifest = export(c, Path("out/minilm"))     # atomic, hashed and signed like a compile
    result = bench(Path("out/minilm"))

This is the facade on top of the house: it may import the application layer and the
registries of passes and exporters; nothing in the core imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.app.bench import BenchConfig, bench_bundle
from compressor.app.compile import (
    Compressed,
    apply_recipe,
    compile_recipe,
    export_bundle,
    protected_paths,
    work_dir_for,
)
from compressor.bundle import BundleWriter
from compressor.errors import CompressorError
from compressor.progress import ProgressSetting
from compressor.recipe import Recipe
from compressor.recipe import load_recipe as _load_recipe

__all__ = ["BenchConfig", "Compressed", "bench", "compile_recipe", "compress", "export", "load_recipe"]

log = logging.getLogger(__name__)


def load_recipe(name_or_path: str | Path, target: str | None = None, model: str | None = None) -> Recipe:
    """A shipped recipe by name, or a recipe file; ``target`` / ``model`` replace its own
    (what ``--target`` and ``--model`` do on the command line)."""
    recipe = _load_recipe(name_or_path)
    if target:
        recipe = recipe.with_target(target)
    if model:
        recipe = recipe.with_model(model)
    return recipe


def _adapter(
    model: nn.Module | None, adapter: ModelAdapter | None, data: DataSplits | None
) -> ModelAdapter | None:
    """The adapter to run on: ``adapter``, a ``ModuleAdapter`` around ``model`` and ``data``,
    or None (the recipe's own model)."""
    if model is None:
        if data is not None and adapter is None:
            raise CompressorError("compress: data= goes with model= (a ModuleAdapter's batches); pass both")
        return adapter
    if adapter is not None:
        raise CompressorError("compress: give model= (with data=) or adapter=, not both")
    if data is None:
        raise CompressorError("compress: model= needs data= (calibration, train and eval batches)")
    from compressor.adapters.module import ModuleAdapter

    return ModuleAdapter(model, data)


def compress(
    recipe: Recipe,
    model: nn.Module | None = None,
    data: DataSplits | None = None,
    adapter: ModelAdapter | None = None,
    work_dir: Path | None = None,
    progress: ProgressSetting = False,
    on_stage: Callable[[str], None] | None = None,
) -> Compressed:
    """Apply ``recipe`` to a model in memory and return it with its teacher, data and pass
    results; nothing is written. The model is the recipe's, or ``model`` with its ``data``
    (a ``ModuleAdapter``), or any ``adapter``. ``work_dir`` is the passes' scratch space
    (default: a temporary folder removed afterwards). Raises if a fidelity floor fails."""
    stage = on_stage or log.info
    with work_dir_for(work_dir, report=stage) as work:
        return apply_recipe(recipe, _adapter(model, adapter, data), work, progress, stage)


def export(
    compressed: Compressed,
    out_dir: Path,
    overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
    run_bench: bool = True,
) -> dict[str, Any]:
    """Write ``compressed`` as a bundle at ``out_dir`` (atomically, hashed and signed, as a
    compile does: the recipe's exports, their verification, its benchmark unless
    ``run_bench`` is False, the reports); returns the manifest as written."""
    stage = on_stage or log.info
    with BundleWriter(out_dir, overwrite, protected_paths(compressed.recipe, None), report=stage) as bundle:
        export_bundle(compressed, bundle, stage, bench=run_bench)
    assert bundle.written is not None
    return bundle.written


def bench(bundle: Path, config: BenchConfig | None = None) -> dict[str, Any]:
    """Time ``bundle`` on each engine it can run on beside the baseline, and score each
    engine's outputs against the original model (``compressor.app.bench.bench_bundle``)."""
    return bench_bundle(Path(bundle), config)
