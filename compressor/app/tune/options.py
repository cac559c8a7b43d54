"""The tuner's inputs and outputs: the budget, the options, the verification, the result."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.app.tune.fingerprint import HostFingerprint
from compressor.app.tune.search import Plan, Rejected
from compressor.errors import RecipeError

ORIGINAL = "original"
"""The unpruned structure's name."""


@dataclass(frozen=True)
class Budget:
    """``mean_cosine>=0.97``: the fidelity the tuned model must keep on held-out data."""

    metric: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        m = re.fullmatch(r"\s*([a-z_]+)\s*>=\s*([0-9.eE+-]+)\s*", text)
        if m is None:
            raise RecipeError(f"--budget {text!r}: write it as METRIC>=VALUE, e.g. mean_cosine>=0.97")
        metric, value = m.group(1), float(m.group(2))
        if metric != "mean_cosine":
            raise RecipeError(
                f"--budget {text!r}: tune judges mean_cosine budgets (sentence encoders); {metric} is not one yet"
            )
        if not 0.0 < value < 1.0:
            raise RecipeError(f"--budget {text!r}: {value} is not in (0, 1)")
        return cls(metric, value, f"{metric}>={value:g}")


@dataclass(frozen=True)
class TuneOptions:
    budget: Budget
    target: str = "cpu"
    recipe: str | None = None  # the base recipe (model, data, exports); the target's default
    model: str | None = None  # replaces the base recipe's model source
    batches: tuple[int, ...] = (1, 32)
    seq_len: int = 128
    threads: int = 2
    time_limit_s: float = 1800.0  # for profiling, probes and costs (the verification comes after)
    structures: tuple[tuple[int, int], ...] | None = None  # (layers, ffn); None: a grid; (): no pruning
    forms: tuple[str, ...] | None = None  # None: every form the target can run
    probe_steps: int = 100
    recover_steps: int = 1000
    qad_steps: int = 30
    verify: bool = True
    max_verify: int = 3
    min_gain: float = 0.03  # a form must be at least this much faster than float (or the noise floor)
    calibration_batches: int = 1  # for the layer costs: each cost is one forward over these
    cache: Path | None = None  # the profile folder (default: compressor.app.tune.profile.cache_dir)
    name: str = "tuned"

    @property
    def primary(self) -> tuple[int, int]:
        """The shape the search minimises: the largest declared batch at ``seq_len``."""
        return max(self.batches), self.seq_len

    @property
    def io_shapes(self) -> list[tuple[int, int]]:
        return [(b, self.seq_len) for b in self.batches]


@dataclass
class Verification:
    plan: Plan
    fidelity: float | None  # judged: the worst held-out domain
    where: str
    metrics: dict[str, float]
    latency: dict[str, dict[str, float]]  # "BxS" -> {"ms", "baseline_ms", "speedup"}
    met: bool
    seconds: float


@dataclass
class TuneResult:
    options: TuneOptions
    fingerprint: HostFingerprint
    estimated: bool
    profile_stats: dict[str, Any]
    margin: float
    structures: list[dict[str, Any]]
    rejected: list[Rejected]
    front: list[Plan]
    chosen: Plan | None
    recipe: dict[str, Any] | None
    verifications: list[Verification] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
