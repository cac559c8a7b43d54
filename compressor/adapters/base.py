"""What the pipeline needs to know about a model family.

An adapter loads the model, turns real data into batches, runs the model on a batch,
and scores a student against its teacher. Passes never special-case a model family:
they ask the adapter (which Linear layers exist, which norm feeds which projections
for SmoothQuant, what the hidden states are for distillation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass
class DataSplits:
    """Disjoint calibration, training (distillation) and held-out evaluation batches."""

    calibration: list[Batch]
    train: list[Batch]
    eval: list[Batch]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SmoothGroup:
    """Linear layers that read the same activation, and the module that produces it.

    ``producer`` is a norm whose output feeds only these linears (pre-norm models), so
    its weight and bias can absorb a SmoothQuant divisor; or None (e.g. post-LN BERT,
    where the norm output is also the residual stream), in which case the divisor
    stays an explicit input scale of the linears.
    """

    producer: str | None
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ExportSpec:
    """How to trace a model for ONNX: the wrapper module, inputs and their names."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


def token_cases(batch: Batch, batch_sizes: Sequence[int], lengths: Sequence[int]) -> list[Batch]:
    """Every (batch size, length) pair: the first rows and positions of a held-out token batch."""
    return [{k: v[:b, :t].contiguous() for k, v in batch.items()} for b in batch_sizes for t in lengths]


class ModelAdapter(ABC):
    name: ClassVar[str]

    @abstractmethod
    def load(self, source: str) -> nn.Module:
        """The model in eval mode, float32, on the CPU."""

    @abstractmethod
    def make_data(self, spec: Any, seed: int) -> DataSplits:
        """Calibration / training / evaluation batches from real data."""

    @abstractmethod
    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The output that fidelity and distillation compare (e.g. sentence embeddings)."""

    def forward_with_hidden(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output and per-layer hidden states (for SquareHead distillation)."""
        return self.forward(model, batch), []

    @abstractmethod
    def metrics(self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
        """Fidelity vs the teacher plus size figures, measured on ``batches``."""

    def linear_names(self, model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def smooth_groups(self, model: nn.Module) -> list[SmoothGroup]:
        """Default: every Linear is its own group with an explicit input scale."""
        return [SmoothGroup(None, (n,)) for n in self.linear_names(model)]

    def verification_cases(
        self, batch: Batch, batch_sizes: Sequence[int], lengths: Sequence[int]
    ) -> list[Batch]:
        """Inputs of several shapes cut from a held-out batch (default: batch sizes only)."""
        return [{k: v[:b] for k, v in batch.items()} for b in batch_sizes]

    def export_spec(self, model: nn.Module, batch: Batch, fused: bool = True) -> ExportSpec:
        raise NotImplementedError(f"{type(self).__name__} does not support ONNX export")

    def iter_inputs(self, batches: Sequence[Batch]) -> Iterator[Batch]:
        yield from batches
