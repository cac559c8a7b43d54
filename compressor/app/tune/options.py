"""The tuner's inputs and outputs: the budget, the options, the verification, the result."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.app.tune.fingerprint import HostFingerprint
from compressor.app.tune.search import Plan, Rejected
from compressor.errors import RecipeError

ORIGINAL = "original"
"""The unpruned structure's name."""


BUDGETS = {
    # metric: (its direction, the recipe key that gates it, the adapter family it judges)
    "mean_cosine": (">=", "min_mean_cosine", "sentence encoders"),
    "perplexity_ratio": ("<=", "headline_limit", "decoder LMs"),
    "fd": ("<=", "headline_limit", "diffusion denoisers"),
}


@dataclass(frozen=True)
class Budget:
    """``mean_cosine>=0.97``, ``perplexity_ratio<=1.05`` or ``fd<=1.2``: the fidelity the tuned
    model must keep on held-out data.

    The search works on a **score** where higher is better and one-layer losses add: the mean
    cosine itself; for a perplexity ratio, ``-log(ratio)`` (the mean next-token log-likelihood
    the student gives up, per token: per-layer increases of a cross-entropy add to first
    order, ratios multiply); for a Frechet distance, ``-fd`` (``sensitivity`` says how the
    layers' shares are measured)."""

    metric: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        m = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=)\s*([0-9.eE+-]+)\s*", text)
        if m is None:
            raise RecipeError(
                f"--budget {text!r}: write it as METRIC>=VALUE or METRIC<=VALUE, e.g. mean_cosine>=0.97 "
                "or perplexity_ratio<=1.05"
            )
        metric, op, raw = m.groups()
        if metric not in BUDGETS:
            known = ", ".join(f"{k} ({v[2]})" for k, v in BUDGETS.items())
            raise RecipeError(f"--budget {text!r}: tune judges {known}; {metric} is not one yet")
        if op != BUDGETS[metric][0]:
            raise RecipeError(
                f"--budget {text!r}: {metric} is a {'floor' if op == '<=' else 'ceiling'}: write {metric}{BUDGETS[metric][0]}VALUE"
            )
        try:
            value = float(raw)
        except ValueError:
            raise RecipeError(f"--budget {text!r}: {raw!r} is not a number") from None
        if metric == "mean_cosine" and not 0.0 < value < 1.0:
            raise RecipeError(f"--budget {text!r}: {value} is not in (0, 1)")
        if metric == "perplexity_ratio" and not 1.0 < value < 100.0:
            raise RecipeError(f"--budget {text!r}: {value} is not in (1, 100) (1 is the teacher itself)")
        if metric == "fd" and not 0.0 < value < 1e6:
            raise RecipeError(f"--budget {text!r}: a Frechet distance budget must be above 0")
        return cls(metric, value, f"{metric}{op}{value:g}")

    @property
    def higher_is_better(self) -> bool:
        return BUDGETS[self.metric][0] == ">="

    @property
    def recipe_key(self) -> str:
        """The ``evaluation`` key of a recipe that gates on this budget."""
        return BUDGETS[self.metric][1]

    def score(self, value: float) -> float:
        """A metric value on the search's scale (higher is better, losses add)."""
        if self.metric == "perplexity_ratio":
            return -math.log(max(float(value), 1e-12))
        return float(value) if self.higher_is_better else -float(value)

    def value_of(self, score: float) -> float:
        """The metric value a score stands for (``score``'s inverse)."""
        if self.metric == "perplexity_ratio":
            return math.exp(-float(score))
        return float(score) if self.higher_is_better else -float(score)

    @property
    def floor(self) -> float:
        """The budget on the score scale: a plan must score at least this."""
        return self.score(self.value)

    def met_by(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if self.higher_is_better else value <= self.value


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
    # decoder LMs: also the decode shapes (each batch x one new token); the tuner sets it
    decode: bool = False

    @property
    def primary(self) -> tuple[int, int]:
        """The shape the search minimises: the largest declared batch at ``seq_len``."""
        return max(self.batches), self.seq_len

    @property
    def io_shapes(self) -> list[tuple[int, int]]:
        """Every shape a form must not be slower at: the prefill shapes (each batch x
        ``seq_len``), then for decoder LMs the decode shapes (each batch x 1 token)."""
        prefill = [(b, self.seq_len) for b in self.batches]
        return prefill + ([(b, 1) for b in self.batches if self.seq_len != 1] if self.decode else [])


@dataclass
class Verification:
    plan: Plan
    fidelity: float | None  # judged: the worst held-out domain
    where: str
    metrics: dict[str, float]
    latency: dict[str, dict[str, float]]  # "BxS" -> {"ms", "baseline_ms", "speedup"}
    met: bool
    seconds: float
    slower_at: dict[str, float] = field(default_factory=dict)  # shape -> speed-up, where under 1 - margin


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
