"""Learning curves as a self-contained SVG, written by hand (no plotting dependency): one polyline per series."""

import json
import math
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
GRPO_SERIES = ("reward", "accuracy", "format_reward")


def read_log(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def default_series(records: list[dict]) -> list[str]:
    """GRPO's reward, accuracy and format reward, and held-out evaluations (eval/*); a loss when none is logged."""
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    series = [k for k in GRPO_SERIES if k in keys] + sorted(k for k in keys if k.startswith("eval/"))
    return series or [k for k in ("loss", "lm_loss") if k in keys][:1]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def svg_curves(curves: dict[str, list[tuple[float, float]]], title: str = "", x_label: str = "step",
               width: int = 720, height: int = 420) -> str:
    """An SVG line chart: curves maps a name to its (x, y) points. Values in [0, 1] get a fixed [0, 1] axis."""
    left, right, top, bottom = 60, 170, 36, 48
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in curves.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in curves.values() for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (0.0, 1.0) if min(ys) >= 0 and max(ys) <= 1 else (min(ys), max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">'),
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left + pw / 2:.1f}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for t in _ticks(y0, y1):  # horizontal grid and y labels
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 4}" stroke="black"/>')
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>')
    for k, (name, pts) in enumerate(curves.items()):
        color = COLORS[k % len(COLORS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline data-series={quoteattr(name)} points="{points}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"/>')
        if len(pts) <= 30:  # sparse series (held-out evaluations): mark the points
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        ly = top + 14 + 18 * k
        out.append(f'<line x1="{left + pw + 12}" y1="{ly - 4}" x2="{left + pw + 32}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 38}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plot_log(log_path: str | Path, out_path: str | Path, series: list[str] | None = None, title: str = "",
             x_key: str = "step") -> Path:
    """Plot series of a JSONL training log against x_key into an SVG file; records lacking a series are skipped
    for that series (held-out evaluations are logged every few steps only)."""
    records = read_log(log_path)
    series = series or default_series(records)
    curves = {name: [(float(r[x_key]), float(r[name])) for r in records
                     if isinstance(r.get(name), (int, float)) and x_key in r] for name in series}
    out_path = Path(out_path)
    out_path.write_text(svg_curves(curves, title=title, x_label=x_key))
    return out_path
