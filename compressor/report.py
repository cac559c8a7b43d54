"""The bundle's human-readable report: per-pass metrics and the benchmark, as markdown and HTML."""

from __future__ import annotations

import html
from typing import Any

_METRIC_COLUMNS = (
    ("mean_cosine", "mean cos", "{:.5f}"),
    ("min_cosine", "min cos", "{:.5f}"),
    ("spearman", "spearman", "{:.5f}"),
    ("params", "params", "{:,.0f}"),
    ("weight_bytes", "weight MB", None),
    ("linear_sparsity", "sparsity", "{:.3f}"),
)


def _fmt(key: str, fmt: str | None, value: Any) -> str:
    if value is None:
        return "-"
    if key == "weight_bytes":
        return f"{value / 1e6:.2f}"
    return fmt.format(value) if fmt else str(value)


def pass_table(passes: list[dict[str, Any]]) -> list[list[str]]:
    header = ["pass", "wall s"] + [label for _, label, _ in _METRIC_COLUMNS]
    rows = [header]
    for p in passes:
        m = p.get("metrics", {})
        rows.append(
            [p["pass"], f"{p.get('wall_s', 0):.1f}"] + [_fmt(k, f, m.get(k)) for k, _, f in _METRIC_COLUMNS]
        )
    return rows


def _engine_label(bench: dict[str, Any], name: str) -> str:
    return str(bench["engines"][name].get("label", name))


def _timed_engines(bench: dict[str, Any]) -> list[str]:
    return [n for n, s in bench.get("engines", {}).items() if s.get("status") == "ok"]


def bench_table(bench: dict[str, Any]) -> list[list[str]]:
    base = bench.get("baseline")
    speed_key = f"speedup_vs_{base}"
    header = ["batch x len", "engine", "median ms", "p90 ms", "p99 ms", "items/s"]
    rows = [header + ([f"speedup vs {base}"] if base else [])]
    for r in bench.get("latency", []):
        for name in _timed_engines(bench):
            s = r["engines"].get(name)
            if s is None:
                continue
            row = [
                f"{r['batch']} x {r['seq_len']}",
                name,
                f"{s['median_ms']:.2f}",
                f"{s['p90_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                f"{s['throughput_per_s']:.1f}",
            ]
            rows.append(row + ([f"{s[speed_key]:.2f}x"] if base else []))
    return rows


def fidelity_table(bench: dict[str, Any]) -> list[list[str]]:
    rows = [["engine", "what runs", "timed", "mean cos", "min cos", "spearman", "held-out texts"]]
    for name in _timed_engines(bench):
        s = bench["engines"][name]
        f = s.get("fidelity")
        cells = (
            [f"{f['mean_cosine']:.5f}", f"{f['min_cosine']:.5f}", f"{f['spearman']:.5f}", str(f["texts"])]
            if f
            else ["-", "-", "-", "-"]
        )
        rows.append([name, _engine_label(bench, name), s.get("timed", "")] + cells)
    return rows


def skipped_engines(bench: dict[str, Any]) -> list[str]:
    return [f"{n}: {s['reason']}" for n, s in bench.get("engines", {}).items() if s.get("status") != "ok"]


def bench_charts(bench: dict[str, Any]) -> list[str]:
    """SVG: latency vs batch per engine, and fidelity vs speed at the largest batch."""
    from compressor.plots import line_chart, scatter_chart

    names = _timed_engines(bench)
    latency = bench.get("latency", [])
    series = {
        n: [(r["batch"], r["engines"][n]["median_ms"]) for r in latency if n in r["engines"]] for n in names
    }
    charts = [
        line_chart(series, "latency vs batch", f"batch (x {bench.get('seq_len', '')} tokens)", "median ms")
    ]
    base = bench.get("baseline")
    if base and latency:
        last = latency[-1]
        points = {
            n: (
                last["engines"][n][f"speedup_vs_{base}"],
                bench["engines"][n]["fidelity"]["mean_cosine"],
            )
            for n in names
            if n in last["engines"] and bench["engines"][n].get("fidelity")
        }
        charts.append(
            scatter_chart(
                points,
                "fidelity vs speed",
                f"speedup vs {base} at batch {last['batch']}",
                "mean cosine vs the original model",
            )
        )
    return [c for c in charts if c]


def bench_summary(bench: dict[str, Any]) -> str:
    return f"{bench.get('device', 'cpu')}, {bench.get('threads', 0)} threads, real held-out sentences"


def render_bench_markdown(bench: dict[str, Any], title: str) -> str:
    parts = [f"# {title}", "", f"Benchmark ({bench_summary(bench)}).", ""]
    parts += [markdown_table(bench_table(bench)), "", "## Fidelity vs the original model", ""]
    parts.append(markdown_table(fidelity_table(bench)))
    skipped = skipped_engines(bench)
    if skipped:
        parts += ["", "## Not run", ""] + [f"- {s}" for s in skipped]
    return "\n".join(parts) + "\n"


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_markdown(manifest: dict[str, Any]) -> str:
    parts = [f"# {manifest.get('name', 'bundle')}: {manifest.get('target', {}).get('name', '')}", ""]
    parts += [
        "## Passes (metrics on held-out text after each pass)",
        "",
        markdown_table(pass_table(manifest["passes"])),
    ]
    bench = manifest.get("benchmark")
    if bench:
        parts += ["", f"## Benchmark ({bench_summary(bench)})", ""]
        parts += [
            markdown_table(bench_table(bench)),
            "",
            "Fidelity of each engine vs the original model:",
            "",
        ]
        parts.append(markdown_table(fidelity_table(bench)))
    return "\n".join(parts) + "\n"


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_page(title: str, body: list[str]) -> str:
    t = html.escape(title)
    return "".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{t}</title><style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;"
            "text-align:right}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}"
            "</style>",
            f"</head><body><h1>{t}</h1>",
            *body,
            "</body></html>",
        ]
    )


def _bench_html(bench: dict[str, Any]) -> list[str]:
    parts = [f"<p>{html.escape(bench_summary(bench))}</p>", _html_table(bench_table(bench))]
    parts += ["<h3>Fidelity vs the original model</h3>", _html_table(fidelity_table(bench))]
    skipped = skipped_engines(bench)
    if skipped:
        parts += ["<h3>Not run</h3><ul>"] + [f"<li>{html.escape(s)}</li>" for s in skipped] + ["</ul>"]
    parts += [f"<div>{svg}</div>" for svg in bench_charts(bench)]
    return parts


def render_bench_html(bench: dict[str, Any], title: str) -> str:
    return _html_page(title, _bench_html(bench))


def render_html(manifest: dict[str, Any]) -> str:
    title = f"{manifest.get('name', 'bundle')}: {manifest.get('target', {}).get('name', '')}"
    body = ["<h2>Passes</h2>", _html_table(pass_table(manifest["passes"]))]
    if manifest.get("benchmark"):
        body += ["<h2>Benchmark</h2>", *_bench_html(manifest["benchmark"])]
    return _html_page(title, body)
