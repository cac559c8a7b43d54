"""The fidelity gate: refuse to write a bundle whose final model strays too far from its teacher.

A recipe gates fidelity in its ``evaluation`` section: ``min_mean_cosine`` (a floor on the
mean cosine vs the teacher, for the adapters that report one) or ``headline_limit`` (a limit
on the adapter's headline metric, ``ModelAdapter.headline``, which every model family
declares: mean cosine, perplexity ratio, Frechet distance). Two checks, one at each end of
a compile:

- ``check_evaluation`` at plan time, before any work: a gate on a metric this adapter does
  not report is refused with one line that names the option, the adapter's headline metric
  and what to use instead (a gate that could never be judged would pass every compile);
- ``fidelity_gate`` after the pipeline, before the bundle is written: a final metric that
  breaks a gate, or a gated metric that is missing or not a number, fails the compile.

Where the held-out data has several evaluation domains (``compressor.text_data``), a gate
judges the **worst domain** (``mean_cosine@domain=...``), so a model that holds up on the
text it was trained on cannot hide a domain it never saw behind the average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from compressor.adapters.base import Headline, ModelAdapter, worst_group_value
from compressor.errors import PassError, RecipeError
from compressor.recipe import EvaluationSpec

MEAN_COSINE = Headline("mean_cosine", "mean cosine", higher_is_better=True)


@dataclass(frozen=True)
class Gate:
    """One limit on one metric: ``option`` is the recipe key that set it."""

    option: str
    metric: Headline
    limit: float

    def broken_by(self, value: float) -> bool:
        return value < self.limit if self.metric.higher_is_better else value > self.limit

    def describe(self, value: float, where: str = "") -> str:
        side = "below" if self.metric.higher_is_better else "above"
        return f"final {self.metric.label}{where} {value:.5f} is {side} {self.option} {self.limit}"

    def judged_value(self, metrics: Mapping[str, float]) -> tuple[float | None, str]:
        """The value this gate judges: the worst evaluation domain's where there are domains,
        else the metric over all held-out data; and words saying which."""
        key, higher = self.metric.key, self.metric.higher_is_better
        worst = worst_group_value(dict(metrics), key, higher, "domain")
        if worst is None:
            value = metrics.get(key)
            return (None if value is None else float(value)), ""
        domain = next(
            k.split("=", 1)[1]
            for k, v in metrics.items()
            if k.startswith(f"{key}@domain=") and float(v) == worst
        )
        return worst, f" on its worst evaluation domain ({domain})"


def headline_of(adapter: ModelAdapter) -> Headline | None:
    """The adapter's declared headline metric (None for an adapter that declares none)."""
    return getattr(type(adapter), "headline", None)


def _headline_hint(adapter: ModelAdapter) -> str:
    headline = headline_of(adapter)
    if headline is None:
        return f"the {adapter.name} adapter declares no headline metric"
    better = "higher" if headline.higher_is_better else "lower"
    return f"its headline metric is {headline.key} ({headline.label}, {better} is better)"


def gates(evaluation: EvaluationSpec, adapter: ModelAdapter) -> list[Gate]:
    """The gates ``evaluation`` sets for ``adapter`` (refused when one names no metric)."""
    out = []
    if evaluation.min_mean_cosine is not None:
        out.append(Gate("evaluation.min_mean_cosine", MEAN_COSINE, evaluation.min_mean_cosine))
    if evaluation.headline_limit is not None:
        headline = headline_of(adapter)
        if headline is None:
            raise RecipeError(
                f"evaluation.headline_limit: the {adapter.name} adapter declares no headline metric "
                "(ModelAdapter.headline); gate on a metric it reports, or declare one"
            )
        out.append(Gate("evaluation.headline_limit", headline, evaluation.headline_limit))
    return out


def check_evaluation(evaluation: EvaluationSpec, adapter: ModelAdapter) -> None:
    """Plan time: refuse a gate on a metric this adapter does not report.

    An adapter without ``fidelity_metrics`` cannot be checked here; ``fidelity_gate`` still
    refuses to pass when the metric is missing from its final metrics."""
    reported: frozenset[str] | None = getattr(type(adapter), "fidelity_metrics", None)
    for gate in gates(evaluation, adapter):
        if reported is not None and gate.metric.key not in reported:
            instead = (
                "evaluation.headline_limit" if gate.option != "evaluation.headline_limit" else "another gate"
            )
            raise RecipeError(
                f"{gate.option}: the {adapter.name} adapter does not report {gate.metric.key}; "
                f"{_headline_hint(adapter)}: use {instead} instead"
            )


def fidelity_gate(
    evaluation: EvaluationSpec, adapter: ModelAdapter, final_metrics: Mapping[str, float]
) -> None:
    """After the pipeline: raise ``PassError`` when the final metrics break a gate, or when a
    gated metric is missing or not a finite number (a gate never passes unjudged)."""
    for gate in gates(evaluation, adapter):
        value, where = gate.judged_value(final_metrics)
        if value is None or not math.isfinite(float(value)):
            got = "is missing from" if value is None else f"is {value} in"
            raise PassError(
                f"{gate.option}: {gate.metric.key} {got} the final metrics of the {adapter.name} adapter, "
                f"so the gate cannot be judged ({_headline_hint(adapter)}); no bundle was written"
            )
        if gate.broken_by(float(value)):
            raise PassError(f"{gate.describe(float(value), where)}; no bundle was written")
