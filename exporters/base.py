"""The exporter contract: write artifacts into a bundle directory and verify them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from compressor.adapters.base import DataSplits, ModelAdapter
from compressor.targets import Target


@dataclass
class ExportContext:
    target: Target
    adapter: ModelAdapter
    data: DataSplits
    reference_model: nn.Module  # the compressed model in torch, the truth the artifact is checked against
    recipe: Any = None  # the whole recipe, for exporters that size things by it (batch sizes)


@dataclass
class ExportResult:
    artifacts: dict[str, str]  # manifest key -> path relative to the bundle
    verification: dict[str, Any]


class Exporter(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def check(self, target: Target) -> None:  # noqa: B027
        """Refuse an export the target cannot use (raise PlanError)."""

    def check_recipe(self, recipe: Any, index: int) -> None:  # noqa: B027
        """Refuse an export whose inputs the recipe's earlier exports do not write (RecipeError);
        ``index`` is this export's position in ``recipe.exports``."""

    @abstractmethod
    def export(self, model: nn.Module, ctx: ExportContext, out_dir: Path) -> ExportResult:
        """Write artifacts under ``out_dir`` and verify them; raise ExportError on mismatch."""


EXPORTER_REGISTRY: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    EXPORTER_REGISTRY[cls.name] = cls
    return cls
