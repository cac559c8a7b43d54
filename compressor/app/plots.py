"""Small self-contained SVG charts for the HTML reports (no plotting library needed).

``line_chart``: one polyline per series on log-log axes (latency vs batch per engine).
``scatter_chart``: labelled points on linear axes (fidelity vs speed per engine).
Both return an ``<svg>`` element as a string, with axis ticks at the data's own values
(log axes) or at evenly spaced round values (linear axes).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

WIDTH, HEIGHT = 640, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 190, 40, 50  # the top margin holds the title, the right one the legend
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def _scale(lo: float, hi: float, log: bool, a: float, b: float):
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5

    def f(v: float) -> float:
        v = math.log10(v) if log else v
        return a + (v - lo) / (hi - lo) * (b - a)

    return f


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float, step: float | None = None) -> str:
    """``v`` with as many decimals as the tick spacing ``step`` needs (4 significant digits
    when no step is given)."""
    if step is None:
        return f"{v:.4g}"
    return f"{v:.{max(0, -math.floor(math.log10(step)))}f}"


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    w, h = WIDTH, HEIGHT
    return [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' "
        "font-family='sans-serif' font-size='11'>",
        f"<title>{html.escape(title)}</title>",
        # the visible title (<title> is only a tooltip)
        f"<text class='chart-title' x='{w / 2}' y='20' text-anchor='middle' font-size='14' "
        f"font-weight='bold'>{html.escape(title)}</text>",
        f"<rect x='{LEFT}' y='{TOP}' width='{w - LEFT - RIGHT}' height='{h - TOP - BOTTOM}' "
        "fill='none' stroke='#444'/>",
        f"<text x='{(LEFT + w - RIGHT) / 2}' y='{h - 10}' text-anchor='middle'>{html.escape(xlabel)}</text>",
        f"<text x='14' y='{(TOP + h - BOTTOM) / 2}' text-anchor='middle' "
        f"transform='rotate(-90 14 {(TOP + h - BOTTOM) / 2})'>{html.escape(ylabel)}</text>",
    ]


def _step(ticks: Sequence[float]) -> float | None:
    return ticks[1] - ticks[0] if len(ticks) > 1 else None


def _ticks(xs: Sequence[float], ys: Sequence[float], fx, fy, linear: bool = False) -> list[str]:
    xstep, ystep = (_step(xs), _step(ys)) if linear else (None, None)
    out = []
    for x in xs:
        px = fx(x)
        out.append(
            f"<line x1='{px:.1f}' y1='{HEIGHT - BOTTOM}' x2='{px:.1f}' y2='{HEIGHT - BOTTOM + 4}' stroke='#444'/>"
        )
        out.append(
            f"<text x='{px:.1f}' y='{HEIGHT - BOTTOM + 16}' text-anchor='middle'>{_fmt(x, xstep)}</text>"
        )
    for y in ys:
        py = fy(y)
        out.append(f"<line x1='{LEFT - 4}' y1='{py:.1f}' x2='{LEFT}' y2='{py:.1f}' stroke='#444'/>")
        out.append(f"<line x1='{LEFT}' y1='{py:.1f}' x2='{WIDTH - RIGHT}' y2='{py:.1f}' stroke='#ddd'/>")
        out.append(f"<text x='{LEFT - 6}' y='{py + 4:.1f}' text-anchor='end'>{_fmt(y, ystep)}</text>")
    return out


def _legend(i: int, name: str, color: str) -> str:
    x, y = WIDTH - RIGHT + 12, TOP + 14 + 16 * i
    return (
        f"<rect x='{x}' y='{y - 8}' width='10' height='10' fill='{color}'/>"
        f"<text x='{x + 16}' y='{y + 1}'>{html.escape(name)}</text>"
    )


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str
) -> str:
    """Log-log lines, one per series (positive values only), under a visible ``title``."""
    if not title.strip():
        raise ValueError("line_chart: every chart needs a title")
    points = [p for pts in series.values() for p in pts if p[0] > 0 and p[1] > 0]
    if not points:
        return ""
    xs, ys = sorted({p[0] for p in points}), [p[1] for p in points]
    fx = _scale(xs[0], xs[-1], True, LEFT + 10, WIDTH - RIGHT - 10)
    ylo, yhi = min(ys) / 1.15, max(ys) * 1.15
    fy = _scale(ylo, yhi, True, HEIGHT - BOTTOM, TOP)
    decades = range(math.floor(math.log10(ylo)), math.ceil(math.log10(yhi)) + 1)
    yticks = [m * 10**d for d in decades for m in (1, 2, 5) if ylo <= m * 10**d <= yhi] or [min(ys), max(ys)]
    out = _frame(title, xlabel, ylabel) + _ticks(xs, yticks, fx, fy)
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        good = [(fx(x), fy(y)) for x, y in pts if x > 0 and y > 0]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in good)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='2'/>")
        out += [f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{color}'/>" for x, y in good]
        out.append(_legend(i, name, color))
    out.append("</svg>")
    return "".join(out)


def _linear_axes(points: Sequence[tuple[float, float]], title: str, xlabel: str, ylabel: str):
    """The frame and ticks of linear axes padded around ``points``, and their scales."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xpad, ypad = (max(xs) - min(xs)) * 0.1 or 0.1, (max(ys) - min(ys)) * 0.1 or 0.001
    xlo, xhi, ylo, yhi = min(xs) - xpad, max(xs) + xpad, min(ys) - ypad, max(ys) + ypad
    fx = _scale(xlo, xhi, False, LEFT, WIDTH - RIGHT)
    fy = _scale(ylo, yhi, False, HEIGHT - BOTTOM, TOP)
    ticks = _ticks(_nice_ticks(xlo, xhi), _nice_ticks(ylo, yhi), fx, fy, linear=True)
    return fx, fy, _frame(title, xlabel, ylabel) + ticks


def scatter_chart(points: Mapping[str, tuple[float, float]], title: str, xlabel: str, ylabel: str) -> str:
    """One labelled point per entry, linear axes padded around the data, under a visible ``title``."""
    if not title.strip():
        raise ValueError("scatter_chart: every chart needs a title")
    if not points:
        return ""
    fx, fy, out = _linear_axes(list(points.values()), title, xlabel, ylabel)
    for i, (name, (x, y)) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        out.append(f"<circle cx='{fx(x):.1f}' cy='{fy(y):.1f}' r='5' fill='{color}'/>")
        out.append(_legend(i, name, color))
    out.append("</svg>")
    return "".join(out)


def series_scatter(
    series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str
) -> str:
    """Points in series (one colour and legend entry each), linear axes padded around the data,
    under a visible ``title``: a Pareto front and the points placed against it."""
    if not title.strip():
        raise ValueError("series_scatter: every chart needs a title")
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    fx, fy, out = _linear_axes(points, title, xlabel, ylabel)
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        out += [f"<circle cx='{fx(x):.1f}' cy='{fy(y):.1f}' r='4' fill='{color}'/>" for x, y in pts]
        out.append(_legend(i, name, color))
    out.append("</svg>")
    return "".join(out)
