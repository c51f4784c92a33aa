"""Charts as inline SVG, drawn on the server: no chart library, nothing to download.

Every chart has a <title> and an aria-label, so a screen reader says what it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 560, 240
PAD_L, PAD_R, PAD_T, PAD_B = 56, 16, 16, 40


def _svg(body: str, label: str, width: int = WIDTH, height: int = HEIGHT) -> Markup:
    label = escape(label)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{label}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{label}</title>{body}</svg>')


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}"
    return f"{v:.3g}"


def line_chart(points: Sequence[tuple[float, float]], *, label: str, x_label: str,
               y_label: str, log_y: bool = False,
               y_range: tuple[float, float] | None = None) -> Markup:
    """One series, x against y (log scale on y for solver residuals; a fixed y range
    for a quantity with known bounds, e.g. an accuracy)."""
    pts = [(float(x), float(y)) for x, y in points
           if math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        return Markup('<p class="muted">No points yet.</p>')
    tr = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in pts], [tr(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range is not None else (min(ys), max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y0 + 0.5
    iw, ih = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * iw

    def sy(y: float) -> float:
        return PAD_T + (1 - (y - y0) / (y1 - y0)) * ih

    parts = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{iw}" height="{ih}" class="frame"/>']
    for k in range(5):  # y ticks
        yv = y0 + (y1 - y0) * k / 4
        shown = 10 ** yv if log_y else yv
        parts.append(f'<line x1="{PAD_L}" x2="{PAD_L + iw}" y1="{sy(yv):.1f}" '
                     f'y2="{sy(yv):.1f}" class="grid"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">'
                     f'{_fmt(shown)}</text>')
    for xv in sorted({x0, x1, round((x0 + x1) / 2)}):
        parts.append(f'<text x="{sx(xv):.1f}" y="{HEIGHT - PAD_B + 16}" '
                     f'text-anchor="middle">{_fmt(xv)}</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True))
    parts.append(f'<polyline points="{path}" class="series"/>')
    parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" class="dot"/>'
                 for x, y in zip(xs, ys, strict=True))
    parts.append(f'<text x="{PAD_L + iw / 2}" y="{HEIGHT - 6}" text-anchor="middle" '
                 f'class="axis">{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{PAD_T + ih / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 14 {PAD_T + ih / 2})">{escape(y_label)}'
                 f'{" (log)" if log_y else ""}</text>')
    return _svg("".join(parts), label)


def reliability_diagram(series: Sequence[tuple[str, str, Sequence[dict]]], *,
                        label: str) -> Markup:
    """Accuracy against confidence per bin, for one or more (name, css class, bins)
    series; the diagonal is perfect calibration. A bin is {lo, hi, count, confidence,
    accuracy}; empty bins are skipped."""
    size = 260
    iw = ih = size - PAD_T - PAD_B + 20
    left = PAD_L

    def sx(v: float) -> float:
        return left + v * iw

    def sy(v: float) -> float:
        return PAD_T + (1 - v) * ih

    parts = [f'<rect x="{left}" y="{PAD_T}" width="{iw}" height="{ih}" class="frame"/>',
             f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(1)}" y2="{sy(1)}" class="diagonal"/>']
    for k in range(0, 11, 2):
        v = k / 10
        parts.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
        parts.append(f'<text x="{sx(v):.1f}" y="{PAD_T + ih + 16}" '
                     f'text-anchor="middle">{v:.1f}</text>')
    for _, css, bins in series:
        pts = [(b["confidence"], b["accuracy"]) for b in bins if b["count"] > 0]
        if pts:
            path = " ".join(f"{sx(c):.1f},{sy(a):.1f}" for c, a in pts)
            parts.append(f'<polyline points="{path}" class="series {css}"/>')
            parts.extend(f'<circle cx="{sx(c):.1f}" cy="{sy(a):.1f}" r="3" class="dot {css}"/>'
                         for c, a in pts)
    width = left + iw + 150
    for k, (name, css, _) in enumerate(series):  # legend
        y = PAD_T + 12 + 18 * k
        parts.append(f'<rect x="{left + iw + 12}" y="{y - 8}" width="10" height="10" '
                     f'class="swatch {css}"/>')
        parts.append(f'<text x="{left + iw + 28}" y="{y + 1}">{escape(name)}</text>')
    parts.append(f'<text x="{left + iw / 2}" y="{size + 14}" text-anchor="middle" '
                 f'class="axis">confidence</text>')
    parts.append(f'<text x="14" y="{PAD_T + ih / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 14 {PAD_T + ih / 2})">accuracy</text>')
    return _svg("".join(parts), label, width=width, height=size + 24)
