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


def bench_table(bench: dict[str, Any]) -> list[list[str]]:
    rows = [["batch x len", "engine", "median ms", "p90 ms", "p99 ms", "items/s", "speedup vs ORT fp32"]]
    for r in bench.get("latency", []):
        for engine in ("ort_fp32", "bundle"):
            if engine not in r:
                continue
            s = r[engine]
            speed = (
                f"{r['speedup_vs_ort_fp32']:.2f}x"
                if engine == "bundle" and "speedup_vs_ort_fp32" in r
                else "1.00x"
            )
            rows.append(
                [
                    f"{r['batch']} x {r['seq_len']}",
                    "ORT fp32 (plain export)" if engine == "ort_fp32" else "compressed bundle (ORT)",
                    f"{s['median_ms']:.1f}",
                    f"{s['p90_ms']:.1f}",
                    f"{s['p99_ms']:.1f}",
                    f"{s['throughput_per_s']:.1f}",
                    speed,
                ]
            )
    return rows


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
        parts += ["", f"## Benchmark ({bench['engine']}, {bench['threads']} threads)", ""]
        parts.append(markdown_table(bench_table(bench)))
        if "fidelity" in bench:
            f = bench["fidelity"]
            parts += [
                "",
                f"Fidelity of the exported engine vs the original model on {f['texts']} held-out texts: "
                f"mean cosine {f['mean_cosine']:.5f}, min {f['min_cosine']:.5f}, Spearman {f['spearman']:.5f}.",
            ]
    return "\n".join(parts) + "\n"


def render_html(manifest: dict[str, Any]) -> str:
    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    title = html.escape(f"{manifest.get('name', 'bundle')}: {manifest.get('target', {}).get('name', '')}")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{title}</title><style>body{{font-family:sans-serif}}td,th{{padding:2px 8px;"
        "text-align:right}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style>",
        f"</head><body><h1>{title}</h1><h2>Passes</h2>",
        table(pass_table(manifest["passes"])),
    ]
    if manifest.get("benchmark"):
        parts += ["<h2>Benchmark</h2>", table(bench_table(manifest["benchmark"]))]
    parts.append("</body></html>")
    return "".join(parts)
