"""Passes, the context they run under, and the pipeline that runs and measures them.

A pass is a small class around plain tensor math: ``plan`` refuses an illegal plan
before any work starts (FP8 on an A100, a pattern that matches no layer), judging the
model as the passes before it will leave it (``compressor.planning.PlanState``), ``requires``
checks the model it is handed, ``run`` changes the model (module replacement, not
graph surgery) and returns it with the details of what it did (``PassOutput``: no side
channel, and nothing kept on the pass between hooks), and ``ensures`` checks the pass's
own invariant on that output (every selected weight is 2:4; every quantized layer has
finite scales). Instruments watch
each pass: the built-in one records the adapter's metrics (fidelity vs the teacher,
parameters, weight bytes, sparsity) after every pass. A result's ``wall_s`` is the whole
time the pass cost the compile, the measuring after it included; ``measure_s`` is that
measuring's share. Long work inside a pass reports through ``PassContext.progress_bar``
(the caller decides what a bar is: ``compressor.progress``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from compressor.config import from_dict, to_dict
from compressor.errors import PassError
from compressor.planning import PlanState
from compressor.progress import Progress, ProgressSetting, progress_bar

if TYPE_CHECKING:
    from compressor.adapters.base import DataSplits, ModelAdapter
    from compressor.targets import Target

log = logging.getLogger(__name__)


@dataclass
class PassContext:
    """What a pass may use besides the model.

    ``device`` is where the algorithm runs (a calibration or training device) and is
    kept apart from ``target``, where the compiled model will be deployed.
    """

    target: Target
    adapter: ModelAdapter
    teacher: nn.Module
    data: DataSplits
    seed: int = 0
    work_dir: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: ProgressSetting = False  # False, True (tqdm) or the caller's bar factory

    def progress_bar(
        self, desc: str, total: int | None = None, unit: str = "step"
    ) -> contextlib.AbstractContextManager[Progress]:
        """A bar for a step of this pass that can take more than a few seconds (a no-op bar
        when the caller asked for no progress)."""
        return progress_bar(self.progress, desc, total, unit)


@dataclass(frozen=True)
class PassOutput:
    """What ``Pass.run`` returns: the model it leaves (the one it was handed, changed in
    place, or a new one) and the details of what it did, for the manifest (per-layer
    decisions, losses) and for its own ``ensures``."""

    model: nn.Module
    details: Mapping[str, Any] = field(default_factory=dict)


C = TypeVar("C")


class Pass(ABC, Generic[C]):
    """One transformation of the model, typed by its frozen config ``C``. Subclasses set
    ``name``, ``description``, ``Config``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.Config()

    @classmethod
    def config_from_dict(cls, data: Any, path: str) -> Any:
        """This pass's config from a recipe entry's options (``path`` names it in errors). A
        pass with one config per scheme overrides it to pick the scheme's config class."""
        return from_dict(cls.Config, data, path)

    def plan(self, state: PlanState) -> PlanState:
        """Refuse an illegal plan before any work starts (raise PlanError), judging the model as
        the passes before this one leave it (``state``); return the state this pass leaves."""
        return state

    def requires(self, model: nn.Module, ctx: PassContext) -> None:  # noqa: B027
        """Check the model handed to this pass (raise PassError)."""

    @abstractmethod
    def run(self, model: nn.Module, ctx: PassContext) -> PassOutput:
        """Change the model; return the model it leaves and the details of what it did."""

    def ensures(self, out: PassOutput, ctx: PassContext) -> None:  # noqa: B027
        """Check this pass's invariant on its output (raise PassError)."""


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


@dataclass
class PassResult:
    name: str
    config: dict[str, Any]
    wall_s: float  # the pass and the measuring after it
    metrics: dict[str, float]
    details: dict[str, Any]
    measure_s: float = 0.0  # the measuring's share of wall_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "config": self.config,
            "wall_s": round(self.wall_s, 3),
            "measure_s": round(self.measure_s, 3),
            "metrics": self.metrics,
            "details": self.details,
        }


class PassInstrument(Protocol):
    def before_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext, result: PassResult) -> None: ...


class MetricsInstrument:
    """Measures the model with the adapter after every pass (and once before any)."""

    def before_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass | None, model: nn.Module, ctx: PassContext, result: PassResult) -> None:
        data = ctx.data
        result.metrics.update(ctx.adapter.grouped_metrics(model, ctx.teacher, data.eval, data.eval_groups))


class Pipeline:
    """Runs passes in order under one context and keeps each pass's result."""

    def __init__(
        self,
        passes: Sequence[Pass],
        instruments: Sequence[PassInstrument] | None = None,
        on_pass_start: Callable[[int, Pass], None] | None = None,
        on_measure_start: Callable[[Pass | None], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments) if instruments is not None else [MetricsInstrument()]
        self.on_pass_start = on_pass_start
        self.on_measure_start = on_measure_start  # the measuring can take minutes (diffusion sampling)
        self.results: list[PassResult] = []

    def _measure(
        self, p: Pass | None, model: nn.Module, ctx: PassContext, wall: float, details: Mapping[str, Any]
    ) -> PassResult:
        """Run the instruments on ``model``; the result's ``wall_s`` is ``wall`` plus this measuring."""
        if self.on_measure_start and self.instruments:
            self.on_measure_start(p)
        start = time.perf_counter()
        result = PassResult(
            name=p.name if p else "original",
            config=to_dict(p.config) if p else {},
            wall_s=wall,
            metrics={},
            details=dict(details),
        )
        for inst in self.instruments:
            inst.after_pass(p, model, ctx, result)
        result.measure_s = time.perf_counter() - start
        result.wall_s = wall + result.measure_s
        return result

    @staticmethod
    def _recover(model: nn.Module, ctx: PassContext, recover: Any) -> dict[str, Any]:
        """Distillation after a lossy pass (its ``recover:`` block); masks and quantizers stay
        fixed. Returns the detail the pass's result records."""
        from compressor.distill.loop import distill_

        if not ctx.data.train:
            raise PassError("recover: needs training data (data.train_samples is 0)")
        losses = distill_(
            model, ctx.teacher, ctx.adapter, ctx.data.train, recover, ctx.progress, work_dir=ctx.work_dir
        )
        return {"steps": len(losses), "loss_first": round(losses[0], 6), "loss_last": round(losses[-1], 6)}

    def run(self, model: nn.Module, ctx: PassContext) -> nn.Module:
        self.results = [self._measure(None, model, ctx, 0.0, {})]
        for i, p in enumerate(self.passes):
            if self.on_pass_start:
                self.on_pass_start(i, p)
            for inst in self.instruments:
                inst.before_pass(p, model, ctx)
            torch.manual_seed(ctx.seed + i)
            start = time.perf_counter()
            p.requires(model, ctx)
            out = p.run(model, ctx)
            model = out.model
            recover = getattr(p.config, "recover", None)
            if recover is not None:
                out = PassOutput(model, {**out.details, "recover": self._recover(model, ctx, recover)})
            p.ensures(out, ctx)
            wall = time.perf_counter() - start
            result = self._measure(p, model, ctx, wall, out.details)
            self.results.append(result)
            log.info(
                "pass %s done in %.1fs (measuring %.1fs): %s",
                p.name,
                result.wall_s,
                result.measure_s,
                result.metrics,
            )
        return model


def ensure_finite(name: str, tensor: torch.Tensor, what: str) -> None:
    """The common invariant check: a scale or weight with NaN/inf is a pass failure."""
    if not torch.isfinite(tensor).all():
        raise PassError(f"{name}: {what} has non-finite values")
