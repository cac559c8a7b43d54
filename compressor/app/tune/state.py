"""What the tuner's steps share: the model, data and options a ``Tuner`` holds while it runs.

``MeasureSteps`` and ``VerifySteps`` are the two halves of ``Tuner`` kept in their own
modules; both read these attributes, which ``Tuner`` sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.app.tune.options import TuneOptions
from compressor.app.tune.sensitivity import SensitivityProbe
from compressor.progress import ProgressSetting
from compressor.recipe import Recipe
from compressor.targets import Target


class TunerState:
    """The attributes a ``Tuner`` holds (set by ``Tuner.__init__``, ``load`` and ``run``)."""

    opts: TuneOptions
    target: Target
    adapter: ModelAdapter
    model: nn.Module
    teacher: nn.Module
    data: DataSplits
    base: Recipe
    progress: ProgressSetting
    stage: Callable[[str], None]
    notes: list[str]
    timings: dict[str, float]
    signatures: dict[str, str]
    probe: SensitivityProbe
    _prunes: dict[str, dict[str, int]]
    on_gpu: bool
    structures: list[dict[str, Any]]
    original_score: float  # the original model's own score on the budget's scale
    margin: float  # the profile's noise floor (``MeasureSteps.noise_margin``)

    def layer_rows(self, model: nn.Module) -> dict[str, dict[tuple[int, int], tuple[int, int, int, int]]]:
        raise NotImplementedError  # MeasureSteps'

    def _mark(self, what: str, since: float) -> None:
        self.timings[what] = round(time.monotonic() - since, 1)

    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        """``model`` as the ``onnx`` exporter traces it (its fused graph, its int8 rewrites)."""
        from compressor.exporters.onnx.onnx import export_onnx

        example = self.adapter.verification_cases(self.data.eval[0], (2,), (16,))[0]
        spec = self.adapter.export_spec(model, example)
        export_onnx(spec.module, spec, path, 17)
        return path
