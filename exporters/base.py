"""The exporter contract: write artifacts into a bundle directory and verify them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.config import SERVING_BATCH_SIZES
from compressor.planning import PlanState
from compressor.targets import Target


@dataclass
class ExportContext:
    target: Target
    adapter: ModelAdapter
    data: DataSplits
    reference_model: nn.Module  # the compressed model in torch, the truth the artifact is checked against
    batch_sizes: tuple[int, ...] = SERVING_BATCH_SIZES  # the batches it will serve (the recipe's bench sizes)
    written: Mapping[str, str] = field(default_factory=dict)  # kind -> file the exports before this wrote


@dataclass
class ExportResult:
    artifacts: dict[str, str]  # manifest key -> path relative to the bundle
    verification: dict[str, Any]


class Exporter(ABC):
    """One bundle format. ``consumes``: artifact kinds it builds from, one of which an export
    before it must write (checked by ``compressor.planning``); ``forms``: the quantized layer
    forms it can take (``None`` = any; ``float`` is always taken); ``kv_cache_forms``: the
    quantized KV caches it can write (none by default); ``output_files`` what it
    writes, by artifact kind."""

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type]
    consumes: ClassVar[tuple[str, ...]] = ()
    forms: ClassVar[frozenset[str] | None] = None
    kv_cache_forms: ClassVar[frozenset[str]] = frozenset()  # quantized KV caches it writes ("fp8")

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def check(self, target: Target) -> None:  # noqa: B027
        """Refuse an export the target cannot use (raise PlanError)."""

    def check_plan(self, state: PlanState) -> None:
        """Refuse an export the planned model or the exports before it cannot feed (raise
        PlanError); ``state`` is the model as the passes leave it, ``state.artifacts`` what the
        earlier exports write, ``state.where`` this export (``exports[1] (tensorrt)``)."""
        self.check(state.target)

    def output_files(self) -> dict[str, str]:
        """Artifact kind -> file this export writes (for the exports after it); by default the
        config's ``file`` under this exporter's name."""
        file = getattr(self.config, "file", None)
        return {self.name: file} if isinstance(file, str) else {self.name: self.name}

    @abstractmethod
    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        """Write artifacts under ``out_dir`` and verify them; raise ExportError on mismatch."""


EXPORTER_REGISTRY: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    EXPORTER_REGISTRY[cls.name] = cls
    return cls
