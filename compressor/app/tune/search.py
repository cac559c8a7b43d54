"""The search: the Pareto front of measured latency against estimated fidelity.

Each layer has a few candidate forms, each with a measured latency change against float
(ms, negative is faster; ``profile``) and an estimated fidelity cost (calibration mean
cosine lost when that layer alone takes the form; ``sensitivity``). A plan picks one form
per layer; its latency is the structure's measured float latency plus the changes, its
estimated fidelity the structure's minus the costs (costs add, the assumption every
sensitivity-list method makes). Minimising latency under a fidelity floor is then a
multiple-choice knapsack, solved exactly over costs rounded up to ``resolution``
(dynamic programming over cost bins): ``best[c]`` is the fastest plan that spends at most
``c`` bins, and the running minimum of ``best`` over ``c`` is the Pareto front.

Before any of that, ``drop_slower_forms`` removes every form the engine runs slower than
float (or not faster than the noise floor measured beside it) at any declared shape: a
compressed form that does not pay is never chosen, and the reason is kept for the report.
Nothing here measures or imports the engine: the tests drive it with given latencies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Choice:
    """One form of one layer: its latency change vs float (ms) and fidelity cost."""

    form: str
    delta_ms: float
    cost: float


@dataclass(frozen=True)
class LayerOptions:
    """A layer and its candidate forms (float, delta 0 and cost 0, is always one)."""

    name: str
    choices: tuple[Choice, ...]


@dataclass(frozen=True)
class Rejected:
    """A form ruled out for a layer before the search, and why."""

    layer: str
    form: str
    ratio: float  # its measured latency / float's, at the shape that ruled it out
    shape: str
    why: str


@dataclass(frozen=True)
class Plan:
    """One point of the front: a structure, a form per layer, its latency and fidelity."""

    structure: str
    forms: Mapping[str, str]
    latency_ms: float  # predicted from the profile
    fidelity: float  # estimated (structure's fidelity minus the layers' costs)
    baseline_ms: float  # the unpruned float model's measured latency, same shape

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.latency_ms

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.forms.values():
            out[f] = out.get(f, 0) + 1
        return out


@dataclass(frozen=True)
class Structure:
    """A block shape (depth, widths) with its measured float latency and estimated fidelity."""

    name: str  # "6x1536" or "original"
    latency_ms: float
    fidelity: float
    layers: tuple[LayerOptions, ...]
    options: Mapping[str, int] = field(default_factory=dict)  # prune options: layers, ffn


PARENT_FORMS = {"2:4+int8": "int8"}
"""A form that adds a lossy step to another must also beat that one: 2:4 on top of int8 is
kept only where the engine runs it faster than plain int8 (on ONNX Runtime's CPU int8 GEMM
the zeros are multiplied like any weight)."""


def drop_slower_forms(
    ratios: Mapping[str, Mapping[str, Mapping[str, float]]],
    margin: float,
    noise: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[dict[str, set[str]], list[Rejected]]:
    """``ratios[layer][form][shape]``: measured latency / float's. A form is kept for a layer
    only when at every shape it is faster than float by the margin there (``ratio <= 1 -
    m``; ``m`` is ``margin``, the noise floor of the whole profile, or where larger the
    layer's own: ``noise[layer][shape]``, how far its float twin strayed from float in the
    same rotation), and than its parent form (``PARENT_FORMS``) where it has one. Returns
    the kept forms per layer and the rejected ones with their worst ratio."""
    kept: dict[str, set[str]] = {}
    rejected: list[Rejected] = []
    for layer, forms in ratios.items():
        kept[layer] = {"float"}
        own = (noise or {}).get(layer, {})
        at = {sh: max(margin, abs(own.get(sh, 1.0) - 1.0)) for f in forms.values() for sh in f}
        for form, by_shape in forms.items():
            if form == "float":
                continue
            # the shape where the form comes closest to (or past) float, by its margin there
            shape, worst = max(by_shape.items(), key=lambda kv: kv[1] + at[kv[0]])
            fast = worst <= 1.0 - at[shape]
            parent = PARENT_FORMS.get(form)
            if fast and parent is not None and parent in forms:
                gains = {sh: forms[parent][sh] - r for sh, r in by_shape.items() if sh in forms[parent]}
                sh, least = min(gains.items(), key=lambda kv: kv[1])
                if least < at[sh] * forms[parent][sh]:
                    why = f"not faster than {parent} beyond the noise floor ({by_shape[sh]:.3f}x vs {forms[parent][sh]:.3f}x) at {sh}"
                    rejected.append(Rejected(layer, form, by_shape[sh], sh, why))
                    continue
            if fast:
                kept[layer].add(form)
                continue
            why = (
                f"slower than float ({worst:.3f}x its latency) at {shape}"
                if worst > 1.0
                else f"not faster than float beyond the noise floor ({worst:.3f}x, margin {at[shape]:.3f}) at {shape}"
            )
            rejected.append(Rejected(layer, form, worst, shape, why))
    return kept, rejected


def pareto_front(
    structure: Structure, baseline_ms: float, max_cost: float, resolution: float = 2e-5
) -> list[Plan]:
    """Every plan of ``structure`` on the front of latency against estimated fidelity, from
    the most faithful (all float) to the fastest whose costs stay within ``max_cost``."""
    bins = max(1, math.ceil(max_cost / resolution))
    inf = math.inf
    best = np.full(bins + 1, inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []  # per layer: the choice index that reached each bin
    for lay in structure.layers:
        new = np.full(bins + 1, inf)
        pick = np.zeros(bins + 1, dtype=np.int32)
        for i, ch in enumerate(lay.choices):
            cb = 0 if ch.cost <= 0 else math.ceil(ch.cost / resolution - 1e-9)
            if cb > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[cb:] = best[: bins + 1 - cb] + ch.delta_ms
            better = cand < new - 1e-12
            new = np.where(better, cand, new)
            pick = np.where(better, i, pick)
        best = new
        picks.append(pick)
    plans: list[Plan] = []
    running = inf
    for c in range(bins + 1):
        if best[c] < running - 1e-9:
            running = float(best[c])
            plans.append(_reconstruct(structure, picks, c, resolution, baseline_ms))
    return plans


def _reconstruct(
    structure: Structure, picks: Sequence[np.ndarray], c: int, resolution: float, baseline_ms: float
) -> Plan:
    forms: dict[str, str] = {}
    delta = 0.0
    cost = 0.0
    for lay, pick in zip(reversed(structure.layers), reversed(picks), strict=True):
        ch = lay.choices[int(pick[c])]
        forms[lay.name] = ch.form
        delta += ch.delta_ms
        cost += ch.cost
        c -= 0 if ch.cost <= 0 else math.ceil(ch.cost / resolution - 1e-9)
    ordered = {lay.name: forms[lay.name] for lay in structure.layers}
    return Plan(structure.name, ordered, structure.latency_ms + delta, structure.fidelity - cost, baseline_ms)


def merge_fronts(fronts: Sequence[Sequence[Plan]]) -> list[Plan]:
    """The plans of several structures' fronts that no other plan beats on both latency and
    fidelity, fastest last."""
    allp = sorted((p for f in fronts for p in f), key=lambda p: (-p.fidelity, p.latency_ms))
    out: list[Plan] = []
    fastest = math.inf
    for p in allp:
        if p.latency_ms < fastest - 1e-9:
            out.append(p)
            fastest = p.latency_ms
    return out


def choose(front: Sequence[Plan], min_fidelity: float) -> Plan | None:
    """The fastest plan whose estimated fidelity meets ``min_fidelity`` (None: none does)."""
    ok = [p for p in front if p.fidelity >= min_fidelity]
    return min(ok, key=lambda p: p.latency_ms) if ok else None


def step_back(front: Sequence[Plan], plan: Plan) -> Plan | None:
    """The next plan toward fidelity along ``front`` after ``plan`` (None: it was the most
    faithful): what to try when ``plan`` missed the budget on the held-out data."""
    better = [p for p in front if p.fidelity > plan.fidelity + 1e-12 and p.latency_ms > plan.latency_ms]
    return min(better, key=lambda p: p.latency_ms) if better else None


def extrapolate_recovery(
    f_half: float, f_full: float, probe_steps: int, full_steps: int, perfect: float = 1.0
) -> float:
    """The fidelity a recovery of ``full_steps`` should reach, from a probe's fidelity after
    half and all of its ``probe_steps``: the loss ``perfect - f`` (the teacher's own score
    less the student's) taken as a power law in steps (``c * t^-k``, the shape distillation
    loss curves follow), ``k`` fitted through the two points and clamped to [0, 1] (a probe
    that got worse predicts no gain; a loss that falls faster than 1/t is not extrapolated
    as such). Never below the probe's own ``f_full``."""
    loss_half, loss_full = max(1e-9, perfect - f_half), max(1e-9, perfect - f_full)
    if full_steps <= probe_steps or loss_full >= loss_half:
        return f_full
    k = min(1.0, math.log(loss_half / loss_full) / math.log(2.0))
    return max(f_full, perfect - loss_full * (full_steps / probe_steps) ** (-k))
