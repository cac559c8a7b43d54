"""The bundle's human-readable report: per-pass metrics and the benchmark, as markdown and HTML."""

from __future__ import annotations

import html
from typing import Any

from compressor.app.pass_table import format_metric, pass_table


def _engine_label(bench: dict[str, Any], name: str) -> str:
    return str(bench["engines"][name].get("label", name))


def _timed_engines(bench: dict[str, Any]) -> list[str]:
    return [n for n, s in bench.get("engines", {}).items() if s.get("status") == "ok"]


# A percentile q is an observed value only when some timed run lies above it: p90 needs at
# least 10 runs and p99 at least 100; from fewer it is the slowest run relabelled.
_TAIL_MIN_RUNS = {"p90_ms": 10, "p99_ms": 100}


def _tail(s: dict[str, Any], key: str) -> str:
    runs = int(s.get("repeats", 0))
    return f"{s[key]:.2f}" if runs >= _TAIL_MIN_RUNS[key] else "-"


def bench_table(bench: dict[str, Any]) -> list[list[str]]:
    """One row per (shape, engine); ``runs`` is how many timed runs each percentile came from,
    and p90 / p99 show ``-`` where there are too few runs for them to mean anything."""
    base = bench.get("baseline")
    speed_key = f"speedup_vs_{base}"
    header = ["batch x len", "engine", "runs", "median ms", "p90 ms", "p99 ms", "items/s"]
    rows = [header + ([f"speedup vs {base}"] if base else [])]
    for r in bench.get("latency", []):
        for name in _timed_engines(bench):
            s = r["engines"].get(name)
            if s is None:
                continue
            row = [
                (f"{r['phase']} " if "phase" in r else "") + f"{r['batch']} x {r['seq_len']}",
                name,
                str(s.get("repeats", "?")),
                f"{s['median_ms']:.2f}",
                _tail(s, "p90_ms"),
                _tail(s, "p99_ms"),
                f"{s['throughput_per_s']:.1f}",
            ]
            rows.append(row + ([f"{s[speed_key]:.2f}x"] if base else []))
    return rows


def percentile_note(bench: dict[str, Any]) -> str | None:
    """A line saying which tail percentiles were left out for too few timed runs, or None."""
    runs = [
        int(s.get("repeats", 0))
        for r in bench.get("latency", [])
        for n, s in r["engines"].items()
        if n in _timed_engines(bench)
    ]
    if not runs:
        return None
    fewest = min(runs)
    missing = [k.removesuffix("_ms") for k, need in _TAIL_MIN_RUNS.items() if fewest < need]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} shown as '-': {fewest} timed runs per row; p90 needs at least "
        f"{_TAIL_MIN_RUNS['p90_ms']} and p99 at least {_TAIL_MIN_RUNS['p99_ms']} (bench --repeats)"
    )


def fidelity_table(bench: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            "engine",
            "what runs",
            "timed",
            "mean cos",
            "worst domain mean cos",
            "min cos",
            "spearman",
            "held-out texts",
        ]
    ]
    for name in _timed_engines(bench):
        s = bench["engines"][name]
        f = s.get("fidelity")
        domains = {k.split("=", 1)[1]: v for k, v in (f or {}).items() if k.startswith("mean_cosine@domain=")}
        worst = min(domains, key=lambda d: domains[d]) if domains else None
        worst_cell = f"{domains[worst]:.5f} ({worst})" if worst else "-"
        cells = (
            [
                f"{f['mean_cosine']:.5f}",
                worst_cell,
                f"{f['min_cosine']:.5f}",
                f"{f['spearman']:.5f}",
                str(f["texts"]),
            ]
            if f
            else ["-", "-", "-", "-", "-"]
        )
        rows.append([name, _engine_label(bench, name), s.get("timed", "")] + cells)
    return rows


def generation_table(bench: dict[str, Any]) -> list[list[str]]:
    """A decoder LM bench: each engine's greedy tokens against the baseline's."""
    rows = [["engine", "what runs", "new tokens", "first divergence from the baseline"]]
    for name in _timed_engines(bench):
        g = bench["engines"][name].get("greedy_vs_baseline")
        if g is None:
            rows.append(
                [name, _engine_label(bench, name), str(bench.get("decode_tokens", "-")), "(the baseline)"]
            )
        else:
            at = g["first_divergence"]
            rows.append(
                [name, _engine_label(bench, name), str(g["new_tokens"]), "none" if at is None else str(at)]
            )
    return rows


def second_section(bench: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """The bench's second table: fidelity per engine, or for a decoder LM its greedy tokens."""
    if "decode_tokens" in bench:
        return "Greedy tokens vs the baseline", generation_table(bench)
    return "Fidelity vs the original model", fidelity_table(bench)


def skipped_engines(bench: dict[str, Any]) -> list[str]:
    return [f"{n}: {s['reason']}" for n, s in bench.get("engines", {}).items() if s.get("status") != "ok"]


def bench_charts(bench: dict[str, Any]) -> list[str]:
    """SVG: latency vs batch per engine, and fidelity vs speed at the largest batch."""
    from compressor.app.plots import line_chart, scatter_chart

    if "decode_tokens" in bench:  # a decoder LM: two phases at batch 1, the tables say it all
        return []
    names = _timed_engines(bench)
    latency = bench.get("latency", [])
    series = {
        n: [(r["batch"], r["engines"][n]["median_ms"]) for r in latency if n in r["engines"]] for n in names
    }
    where = f"{bench.get('device', 'cpu')}, {bench.get('threads', 0)} threads"
    charts = [
        line_chart(
            series,
            f"median latency vs batch size ({where})",
            f"batch (x {bench.get('seq_len', '')} tokens)",
            "median ms",
        )
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
                f"fidelity vs speed at batch {last['batch']} ({where})",
                f"speedup vs {base} at batch {last['batch']}",
                "mean cosine vs the original model",
            )
        )
    return [c for c in charts if c]


_ORT_CHECKED = {
    "onnx": "the ONNX (ONNX Runtime flavour)",
    "onnx_qdq": "the Q/DQ ONNX",
    "triton_repository": "the Triton repository's model file",
}


def measurement_notes(manifest: dict[str, Any]) -> list[str]:
    """What this compile measured and what it did not, in words: the fidelity checks that ran
    here, the benchmark (and whose hardware it ran on), and the engines left to the target."""
    target = manifest.get("target", {})
    name = target.get("name", "?")
    on_gpu = target.get("device") == "cuda"
    final = (manifest.get("passes") or [{}])[-1].get("metrics", {})
    notes = []
    said = "measured here: the compressed model (torch, CPU) vs the original on the held-out data: "
    if "perplexity_ratio" in final:  # a decoder: its headline before its logits' cosines
        notes.append(said + f"perplexity ratio {final['perplexity_ratio']:.4f} (student / teacher)")
    elif "fd" in final:
        notes.append(said + f"Frechet distance {final['fd']:.3f} of its samples to the real images")
    elif "mean_cosine" in final:
        notes.append(said + f"mean cosine {final['mean_cosine']:.5f}")
    for key, v in manifest.get("verification", {}).items():
        if key in _ORT_CHECKED and isinstance(v, dict) and "min_cosine" in v:
            notes.append(
                f"measured here: {_ORT_CHECKED[key]} in ONNX Runtime on this host's CPU vs the torch model: "
                f"min cosine {v['min_cosine']:.5f} over {v.get('cases', '?')} input shapes"
            )
    bench = manifest.get("benchmark")
    if bench and on_gpu and not str(bench.get("device", "cpu")).startswith("cuda"):
        notes.append(
            f"timed here: CPU (ONNX Runtime) on this host, not the {name}: these numbers say nothing "
            f"about speed on the {name}"
        )
    elif bench:
        notes.append(f"timed here: {bench_summary(bench)} (the benchmark below)")
    elif manifest.get("benchmark_skipped"):
        notes.append(f"not timed: {manifest['benchmark_skipped']}")
    trt = manifest.get("verification", {}).get("tensorrt_build")
    if isinstance(trt, dict):
        script = trt.get("script", f"build_engine_{name}.sh")
        if trt.get("engine_built"):
            notes.append(
                f"built here: the TensorRT engine {trt.get('plan')} (not timed: compressor bench --device cuda)"
            )
        else:
            why = trt.get("not_built_because", "no TensorRT here")
            notes.append(
                f"not built or timed here: the TensorRT engine {trt.get('plan', '')} ({why}); it is built on "
                f"the {name} by the bundle's {script}, then timed there with trtexec or compressor bench"
            )
    timed_on_target = bench and str(bench.get("device", "")).startswith("cuda")
    if on_gpu and not timed_on_target and not manifest.get("benchmark_skipped"):
        notes.append(
            f"not measured: latency and throughput on the {name}; run `compressor bench BUNDLE --device cuda` there"
        )
    return notes


def bench_summary(bench: dict[str, Any]) -> str:
    return f"{bench.get('device', 'cpu')}, {bench.get('threads', 0)} threads, real held-out sentences"


def render_bench_markdown(bench: dict[str, Any], title: str) -> str:
    parts = [f"# {title}", "", f"Benchmark ({bench_summary(bench)}).", ""]
    parts += [markdown_table(bench_table(bench)), ""]
    note = percentile_note(bench)
    if note:
        parts += [f"Note: {note}.", ""]
    heading, table = second_section(bench)
    parts += [f"## {heading}", "", markdown_table(table)]
    skipped = skipped_engines(bench)
    if skipped:
        parts += ["", "## Not run", ""] + [f"- {s}" for s in skipped]
    return "\n".join(parts) + "\n"


def group_table(manifest: dict[str, Any]) -> list[list[str]]:
    """The final model's fidelity per evaluation domain and per input-length bucket (the
    ``metric@group`` keys of its metrics; ``compressor.adapters.text_batches``); [] without any."""
    final = (manifest.get("passes") or [{}])[-1].get("metrics", {})
    per_group: dict[str, dict[str, float]] = {}
    for key, value in final.items():
        if "@" in key:
            metric, group = key.split("@", 1)
            per_group.setdefault(group, {})[metric] = value
    if not per_group:
        return []
    metrics = sorted({m for g in per_group.values() for m in g})
    held_out = set(manifest.get("data", {}).get("held_out_domains", []))
    rows = [["group", *metrics]]
    for group in sorted(per_group, key=lambda g: (not g.startswith("domain="), _group_order(g))):
        label = group + (" (held out whole)" if group.split("=", 1)[1] in held_out else "")
        rows.append([label, *[format_metric(m, "{:.5f}", per_group[group].get(m)) for m in metrics]])
    return rows


def _group_order(group: str) -> tuple[int, str]:
    """Length buckets by their lower bound, domains by name."""
    kind, _, rest = group.partition("=")
    lo = rest.split("-", 1)[0]
    return (int(lo), "") if kind == "len" and lo.isdigit() else (0, rest)


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
    groups = group_table(manifest)
    if groups:
        parts += [
            "",
            "## Final fidelity by evaluation domain and input length (tokens)",
            "",
            markdown_table(groups),
        ]
    notes = measurement_notes(manifest)
    if notes:
        parts += ["", "## What was measured", ""] + [f"- {n}" for n in notes]
    bench = manifest.get("benchmark")
    if bench:
        parts += ["", f"## Benchmark ({bench_summary(bench)})", ""]
        parts += [markdown_table(bench_table(bench)), ""]
        note = percentile_note(bench)
        if note:
            parts += [f"Note: {note}.", ""]
        parts += [
            "Fidelity of each engine vs the original model:",
            "",
        ]
        parts.append(markdown_table(fidelity_table(bench)))
    return "\n".join(parts) + "\n"


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:sans-serif;margin:1.5em}"
    "table{border-collapse:collapse;margin:0.5em 0 1em}"
    "td,th{padding:2px 8px;text-align:right}"
    "th{border-bottom:1px solid #888}"
    "tr:nth-child(even){background:#f3f3f3}"
    "p.note{color:#555}"
)


def _html_page(title: str, body: list[str]) -> str:
    # Plain concatenation, no str.format / f-string around the CSS: its braces are literal.
    t = html.escape(title)
    return "".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{t}</title>",
            "<style>",
            _CSS,
            "</style>",
            f"</head><body><h1>{t}</h1>",
            *body,
            "</body></html>",
        ]
    )


def _bench_html(bench: dict[str, Any]) -> list[str]:
    parts = [f"<p>{html.escape(bench_summary(bench))}</p>", _html_table(bench_table(bench))]
    note = percentile_note(bench)
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    heading, table = second_section(bench)
    parts += [f"<h3>{heading}</h3>", _html_table(table)]
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
    groups = group_table(manifest)
    if groups:
        body += [
            "<h2>Final fidelity by evaluation domain and input length (tokens)</h2>",
            _html_table(groups),
        ]
    notes = measurement_notes(manifest)
    if notes:
        body += ["<h2>What was measured</h2><ul>", *[f"<li>{html.escape(n)}</li>" for n in notes], "</ul>"]
    if manifest.get("benchmark"):
        body += ["<h2>Benchmark</h2>", *_bench_html(manifest["benchmark"])]
    return _html_page(title, body)
