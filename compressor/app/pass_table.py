"""The compile's per-pass table: wall time, the measuring's share, and the family's own metrics."""

from __future__ import annotations

from typing import Any

_METRIC_COLUMNS = (
    # each family's own fidelity metrics (a column shows when some pass reports it)
    ("mean_cosine", "mean cos", "{:.5f}"),
    ("min_cosine", "min cos", "{:.5f}"),
    ("spearman", "spearman", "{:.5f}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("perplexity_ratio", "ppl ratio", "{:.4f}"),
    ("kl_per_token", "KL/token", "{:.5f}"),
    ("top1_agreement", "top-1 agree", "{:.4f}"),
    ("fd", "FD", "{:.3f}"),
    ("class_acc", "class acc", "{:.3f}"),
    ("steps", "steps", "{:.0f}"),
    ("nfe", "NFE", "{:.0f}"),
    # size
    ("params", "params", "{:,.0f}"),
    ("weight_bytes", "weight MB", None),
    ("linear_sparsity", "sparsity", "{:.3f}"),
)
# a decoder's headline is its perplexity: the cosines of its logit rows are left to the manifest
_SHADOWED_BY = {"mean_cosine": "perplexity_ratio", "min_cosine": "perplexity_ratio"}


def metric_columns(passes: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """The metric columns some pass reports, in ``_METRIC_COLUMNS`` order: a diffusion compile
    shows FD and class accuracy, a decoder's perplexity, its ratio, KL and top-1 agreement."""
    present = {k for p in passes for k in p.get("metrics", {})}
    return [c for c in _METRIC_COLUMNS if c[0] in present and _SHADOWED_BY.get(c[0]) not in present]


def format_metric(key: str, fmt: str | None, value: Any) -> str:
    if value is None:
        return "-"
    if key == "weight_bytes":
        return f"{value / 1e6:.2f}"
    return fmt.format(value) if fmt else str(value)


def pass_table(passes: list[dict[str, Any]]) -> list[list[str]]:
    """One row per pass: ``wall s`` is all the time the pass cost (the measuring after it
    included) and ``measure s`` that measuring's share (``-`` in manifests from before it was
    kept), then the model family's own metrics (``metric_columns``)."""
    columns = metric_columns(passes)
    header = ["pass", "wall s", "measure s"] + [label for _, label, _ in columns]
    rows = [header]
    for p in passes:
        m = p.get("metrics", {})
        measure = p.get("measure_s")
        rows.append(
            [p["pass"], f"{p.get('wall_s', 0):.1f}", "-" if measure is None else f"{measure:.1f}"]
            + [format_metric(k, f, m.get(k)) for k, _, f in columns]
        )
    return rows
