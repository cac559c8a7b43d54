"""The Python API: load a recipe, apply it to a model in memory, export a bundle, bench it.

The CLI (``compressor.app.cli``), the benchmarks and user code all go through these four
functions, and ``compile_recipe`` is their composition with the output paths checked first:

    recipe = load_recipe("minilm-cpu-int8")
    c = compress(recipe)                         # or compress(recipe, model=net, data=splits)
    # a model you hold, with its family's adapter, your data and teacher:
    #   compress(recipe, model=pruned, adapter=HFEncoderAdapter(), data=splits, teacher=fp32)
    print(c.metrics["mean_cosine"])              # the final model, still in memory: c.model
    manifest = export(c, Path("out/minilm"))     # atomic, hashed and signed like a compile
    result = bench(Path("out/minilm"))

This is the facade on top of the house: it may import the application layer and the
registries of passes and exporters; nothing in the core imports it.
"""

from __future__ import annotations

import copy
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


def _module_adapter(model: nn.Module, data: DataSplits | None) -> ModelAdapter:
    """A ``ModuleAdapter`` around ``model`` and ``data``: what ``model=`` without ``adapter=`` means."""
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
    teacher: nn.Module | None = None,
    measure: bool = True,
) -> Compressed:
    """Apply ``recipe`` to a model in memory and return it with its teacher, data and pass
    results; nothing is written. Raises if a fidelity floor fails.

    Each argument replaces what a compile would build from the recipe:

    - ``model``: the model to compress instead of the recipe's (a copy is compressed; the
      caller's is left as it was, and the plan is checked on it before any pass runs). With
      ``adapter`` it keeps that family's behaviour (``HFEncoderAdapter`` for a BERT);
      without, it is a plain module (a ``ModuleAdapter``), and ``data`` is then required.
    - ``adapter``: the model family instead of the recipe's ``model.adapter``;
    - ``data``: the calibration / train / held-out splits instead of the recipe's ``data``
      (``Compressed.data`` is this object; needed with an adapter that loaded no model, as
      a fresh ``HFEncoderAdapter`` has no tokenizer to build data with);
    - ``teacher``: what metrics and distillation compare against instead of a frozen copy
      of the model before any pass (e.g. the fp32 model, when ``model`` is already pruned);
    - ``measure``: False skips measuring the model before and after every pass (no
      ``metrics``; refused with a recipe that sets a fidelity floor).

    ``work_dir`` is the passes' scratch space (default: a temporary folder removed afterwards).
    """
    stage = on_stage or log.info
    if model is not None:
        if adapter is None:
            adapter, model = _module_adapter(model, data), None  # the adapter loads a copy
        else:
            model = copy.deepcopy(model).eval()
    with work_dir_for(work_dir, report=stage) as work:
        return apply_recipe(
            recipe, adapter, work, progress, stage, model=model, data=data, teacher=teacher, measure=measure
        )


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
