"""What a tune tells its user: the JSON record, the summary table, and tune-report.html.

The record holds everything the choice was made from (the host fingerprint, the noise
margin, each structure's probe, every rejected form with its measured ratio, the whole
front) and what the verification measured; the HTML report draws the front (estimated
fidelity against predicted speed-up), the chosen plan, the verified measurements and the
shipped hand-made recipes of the target as reference points on the same axes.
"""

from __future__ import annotations

import html
from typing import Any

from compressor.app.plots import series_scatter
from compressor.app.tune.options import Budget, TuneResult
from compressor.app.tune.search import Plan


def _plan(p: Plan, budget: Budget) -> dict[str, Any]:
    """A plan as the record shows it: its estimated fidelity in the budget's metric."""
    return {
        "structure": p.structure,
        "latency_ms": round(p.latency_ms, 4),
        "speedup": round(p.speedup, 4),
        "fidelity": round(budget.value_of(p.fidelity), 6),
        "counts": p.counts(),
        "forms": dict(p.forms),
    }


def tune_record(r: TuneResult) -> dict[str, Any]:
    o = r.options
    label = "estimated" if r.estimated else "measured"
    return {
        "tune": 1,
        "budget": o.budget.text,
        "target": o.target,
        "model": o.model or "default",
        "shapes": [f"{b}x{s}" for b, s in o.io_shapes],
        "primary_shape": "{}x{}".format(*o.primary),
        "latency": label,
        "fingerprint": r.fingerprint.to_dict(),
        "profile": r.profile_stats,
        "noise_margin": r.margin,
        "structures": r.structures,
        "rejected": [
            {"layer": x.layer, "form": x.form, "ratio": x.ratio, "shape": x.shape, "why": x.why}
            for x in r.rejected
        ],
        "front": [_plan(p, o.budget) for p in r.front],
        "chosen": None if r.chosen is None else _plan(r.chosen, o.budget),
        "verifications": [
            {
                "plan": _plan(v.plan, o.budget),
                "fidelity": v.fidelity,
                "judged_on": v.where.strip() or "all held-out data",
                "met": v.met,
                "slower_than_ort_fp32_at": v.slower_at,
                "latency": v.latency,
                "seconds": v.seconds,
                "metrics": {k: round(val, 6) for k, val in v.metrics.items()},
            }
            for v in r.verifications
        ],
        "references": r.references,
        "timings_s": r.timings,
        "notes": r.notes,
    }


def rejected_summary(r: TuneResult) -> list[tuple[str, int, float, float, str]]:
    """Per rejected form: how many layers, its best and worst ratio, and one reason."""
    by: dict[str, list[Any]] = {}
    for x in r.rejected:
        by.setdefault(x.form, []).append(x)
    out = []
    for form, xs in sorted(by.items()):
        ratios = [x.ratio for x in xs]
        out.append((form, len(xs), min(ratios), max(ratios), xs[0].why))
    return out


def summary_lines(r: TuneResult) -> list[str]:
    """The table the CLI prints at the end."""
    o = r.options
    est = " (ESTIMATED from the roofline, not measured)" if r.estimated else ""
    lines = [f"host: {r.fingerprint.describe()}{est}", f"noise margin: {r.margin:.3f}"]
    lines.append("\nstructures (float latency vs the original, probe fidelity on calibration data):")
    for s in r.structures:
        probe = f"  probe {s['probe_fidelity']:.5f}" if "probe_fidelity" in s else ""
        skip = f"  skipped: {s['skipped']}" if "skipped" in s else f"  front {s.get('front_points', 0)} plans"
        lines.append(f"  {s['name']:>9}  {s['float_ratio']:.3f}x{probe}{skip}")
    if r.rejected:
        lines.append("\nrejected forms (latency / float's, worst over the declared shapes):")
        for form, n, lo, hi, why in rejected_summary(r):
            lines.append(f"  {form:>14}  {n:3d} layer(s)  {lo:.3f}-{hi:.3f}x  e.g. {why}")
    if r.chosen is not None:
        c = r.chosen
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(c.counts().items()))
        lines.append(
            f"\nchosen: {c.structure}  {counts}\n  predicted {c.speedup:.2f}x the original at {o.primary[0]}x{o.primary[1]}, "
            f"estimated {o.budget.metric} {o.budget.value_of(c.fidelity):.5f}"
        )
    for v in r.verifications:
        lat = ", ".join(f"{k}: {d['speedup']:.2f}x ORT fp32" for k, d in v.latency.items())
        lines.append(
            f"verified {v.plan.structure}: {o.budget.metric} "
            f"{'none' if v.fidelity is None else f'{v.fidelity:.5f}'}{v.where} -> "
            f"{'meets' if o.budget.met_by(v.fidelity) else 'MISSES'} {o.budget.text}; {lat} ({v.seconds:.0f} s)"
            + (f"; SLOWER than ORT fp32 at {', '.join(v.slower_at)}: not chosen" if v.slower_at else "")
        )
    for note in r.notes:
        lines.append(f"note: {note}")
    return lines


def render_tune_html(r: TuneResult) -> str:
    rec = tune_record(r)
    label = rec["latency"]
    budget = r.options.budget
    series: dict[str, list[tuple[float, float]]] = {}
    for p in r.front:
        series.setdefault(f"front {p.structure}", []).append((p.speedup, budget.value_of(p.fidelity)))
    if r.chosen is not None:
        series["chosen (predicted)"] = [(r.chosen.speedup, budget.value_of(r.chosen.fidelity))]
    shape = "{}x{}".format(*r.options.primary)
    for v in r.verifications:
        d = v.latency.get(shape)
        if d is not None and v.fidelity is not None:
            series.setdefault("verified (measured)", []).append((d["speedup"], v.fidelity))
    for ref in r.references:
        series.setdefault(f"hand: {ref['name']}", []).append((ref["speedup"], ref["fidelity"]))
    chart = series_scatter(
        series,
        f"Plans at {shape}: fidelity vs speed-up ({label} latency)",
        "speed-up over the original's float model in the same engine",
        f"{budget.metric} (front: calibration estimate)",
    )
    rows = "".join(
        f"<tr><td>{html.escape(s['name'])}</td><td>{s['float_ratio']:.3f}</td>"
        f"<td>{s.get('probe_fidelity', '')}</td><td>{html.escape(str(s.get('skipped', '')))}</td></tr>"
        for s in r.structures
    )
    rej = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{n}</td><td>{lo:.3f}-{hi:.3f}</td><td>{html.escape(why)}</td></tr>"
        for f, n, lo, hi, why in rejected_summary(r)
    )
    summary = html.escape("\n".join(summary_lines(r)))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>compressor tune</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "pre{background:#f6f6f6;padding:1em}</style></head><body>"
        f"<h1>compressor tune: {html.escape(rec['budget'])} on {html.escape(rec['target'])}</h1>"
        f"<p>Latency {label} on {html.escape(r.fingerprint.describe())}; shapes {', '.join(rec['shapes'])}.</p>"
        f"{chart}"
        "<h2>Structures</h2><table><tr><th>shape</th><th>float latency / original</th><th>probe fidelity</th>"
        f"<th>skipped</th></tr>{rows}</table>"
        "<h2>Rejected forms</h2><table><tr><th>form</th><th>layers</th><th>latency / float</th><th>why</th></tr>"
        f"{rej}</table><h2>Summary</h2><pre>{summary}</pre></body></html>\n"
    )
