"""What the pipeline needs to know about a model family.

An adapter loads the model, turns real data into batches, runs the model on a batch,
and scores a student against its teacher. Passes never special-case a model family:
they ask the adapter (which Linear layers exist, which norm feeds which projections
for SmoothQuant, what the hidden states are for distillation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
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
    # named groups of ``eval`` (batch indices): ``domain=NAME`` per evaluation domain,
    # ``len=LO-HI`` per token-length bucket (``compressor.adapters.text_batches``)
    eval_groups: dict[str, list[int]] = field(default_factory=dict)


def group_metric_key(metric: str, group: str) -> str:
    """The key of ``metric`` measured on one eval group: ``mean_cosine@domain=python-reference``."""
    return f"{metric}@{group}"


def worst_group_value(
    metrics: dict[str, float], metric: str, higher_is_better: bool, kind: str
) -> float | None:
    """The worst value of ``metric`` over the groups of ``kind`` (``domain``), None without any."""
    prefix = f"{metric}@{kind}="
    values = [float(v) for k, v in metrics.items() if k.startswith(prefix)]
    if not values:
        return None
    return min(values) if higher_is_better else max(values)


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


@dataclass(frozen=True)
class Headline:
    """An adapter's headline fidelity metric: the one number that says how close the student
    stays to its teacher, and that ``evaluation.headline_limit`` gates on.

    ``key`` is its key in the adapter's ``metrics()`` dict; ``higher_is_better`` says which
    way a limit points (a floor for a cosine, a ceiling for a perplexity ratio or an FD)."""

    key: str
    label: str
    higher_is_better: bool


@dataclass(frozen=True)
class TimingInputs:
    """Real held-out inputs to time a model family's exports on: ``example()`` a small batch
    to trace the plain export with; ``timing(batch, seq_len)`` a held-out batch padded to
    ``seq_len`` (what ``compressor tune`` and the bench feed ONNX Runtime)."""

    example: Callable[[], Batch]
    timing: Callable[[int, int], Batch]


@dataclass(frozen=True)
class BenchInputs(TimingInputs):
    """What ``compressor bench`` feeds a model family, declared by its adapter (so the bench
    needs no ``isinstance``): real held-out inputs, never random tensors. Beside the timing
    inputs, ``fidelity(n, seed, batch_size, max_length)`` ``n`` held-out samples in batches
    and ``score(student, teacher)`` the fidelity of the outputs."""

    fidelity: Callable[[int, int, int, int], list[Batch]]
    score: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def token_cases(batch: Batch, batch_sizes: Sequence[int], lengths: Sequence[int]) -> list[Batch]:
    """Every (batch size, length) pair: the first rows and positions of a held-out token batch."""
    return [{k: v[:b, :t].contiguous() for k, v in batch.items()} for b in batch_sizes for t in lengths]


class ModelAdapter(ABC):
    name: ClassVar[str]
    # the fidelity metric a compile reports first and ``evaluation.headline_limit`` gates on
    headline: ClassVar[Headline]
    # the fidelity keys ``metrics()`` always reports (so a gate on one can be checked at plan time)
    fidelity_metrics: ClassVar[frozenset[str]]
    # generates token by token (its serving shapes include decode steps of one new token)
    autoregressive: ClassVar[bool] = False

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

    def grouped_metrics(
        self, model: nn.Module, teacher: nn.Module, batches: Sequence[Batch], groups: dict[str, list[int]]
    ) -> dict[str, float]:
        """``metrics`` on all ``batches``, plus each fidelity metric on each group (keys from
        ``group_metric_key``). Default: the model runs once more per group; an adapter whose
        outputs can be scored in parts overrides it to run once."""
        out = self.metrics(model, teacher, batches)
        for group, idx in groups.items():
            part = self.metrics(model, teacher, [batches[i] for i in idx])
            out.update({group_metric_key(k, group): v for k, v in part.items() if k in self.fidelity_metrics})
        return out

    def serving_length(self) -> int | None:
        """The longest input (tokens) the model serves, once loaded; None where length means nothing."""
        return None

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

    def bench_inputs(self) -> BenchInputs | None:
        """The inputs ``compressor bench`` times and scores this family on (the callables run
        after ``load``); None (the default): its bundles cannot be benched."""
        return None

    def timing_inputs(self) -> TimingInputs | None:
        """The inputs an export of this family is timed on (``compressor tune``, the bench's
        timing): the bench inputs' by default; a family the bench cannot score yet may still
        be timed. None: it cannot be timed."""
        return self.bench_inputs()
