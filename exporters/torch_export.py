"""`torch_export` exporter: the ``torch.export`` program (``model.exported.pt2``,
``torch.export.save``) that the `aoti` exporter compiles, captured and verified the same way
(``compressor.exporters.aoti``: dynamic batch/length, held-out inputs of several shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.config import option
from compressor.exporters.aoti import (
    ProgramExportConfig,
    capture_program,
    check_program_target,
    verify_program,
)
from compressor.exporters.base import ExportContext, Exporter, ExportResult, register_exporter
from compressor.targets import Target


@dataclass(frozen=True)
class TorchExportConfig(ProgramExportConfig):
    file: str = option("model.exported.pt2", help="torch.export.save file name inside the bundle")


@register_exporter
class TorchExportExporter(Exporter):
    """The captured ``ExportedProgram`` itself (``torch.export.save``): what ``compressor bench``
    runs as the compressed model in torch eager and under ``torch.compile``, and what a Python
    service can load without the original model code (``torch.export.load(f).module()``).
    Loading it unpickles its constants: load only bundles whose hashes check
    (``compressor bench`` verifies them first)."""

    name = "torch_export"
    description = "torch.export ExportedProgram (model.exported.pt2) with dynamic batch/length, verified"
    Config = TorchExportConfig

    def check(self, target: Target) -> None:
        check_program_target("torch_export", target)

    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        cfg = self.config
        cap = capture_program(model, ctx, cfg, "torch_export")
        path = out_dir / cfg.file
        partial = out_dir / f".partial-{cfg.file}"
        try:
            torch.export.save(cap.program, str(partial))
            loaded = torch.export.load(str(partial)).module()
            report = verify_program(loaded, cfg.file, "saved ExportedProgram", cap, cfg.min_cosine)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        report["max_batch"] = cfg.max_batch
        return ExportResult(artifacts={"torch_export": cfg.file}, verification={"torch_export": report})
