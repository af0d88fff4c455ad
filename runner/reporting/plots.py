"""The report's plots as inline SVG: seconds per denoising step against steps (or per job),
each job's time by phase, peak memory per job.
"""
from __future__ import annotations

import html
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from ..records import FAILED, FINISHED, KILLED, SKIPPED
from .jobs import GridJob

_PALETTE = ["#3b6ea5", "#e07b39", "#4f9a5a", "#b8434a", "#8066a8", "#8c6d46", "#c763a6", "#6f6f6f"]
_W, _H, _ML, _MR, _MT, _MB = 720, 260, 64, 16, 34, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    out = []
    v = first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    if out[-1] < hi:
        out.append(round(out[-1] + step, 12))
    return out


def _fmt_tick(v: float) -> str:
    return f"{v:.6g}"


def escape(text: Any) -> str:
    """`text` safe inside HTML and SVG, attribute values included."""
    return html.escape(str(text), quote=True)


def _svg_frame(title: str, y_label: str, x_label: str, y_ticks: list[float], ymap: Callable[[float], float],
               body: list[str], legend: Sequence[tuple[str, str]] = ()) -> str:
    out = [f'<svg class="plot" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
           f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{_ML}" y="18" class="t">{escape(title)}</text>']
    for t in y_ticks:
        y = ymap(t)
        out.append(f'<line x1="{_ML}" x2="{_W - _MR}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
                   f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_fmt_tick(t))}</text>')
    out.append(f'<text transform="translate(14 {(_MT + _H - _MB) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    out.append(f'<text x="{(_ML + _W - _MR) / 2:.0f}" y="{_H - 6}" text-anchor="middle">{escape(x_label)}</text>')
    lx = _W - _MR
    for name, colour in reversed(list(legend)):
        lx -= 8 + 7 * len(name) + 14
        out.append(f'<rect x="{lx}" y="9" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="18">{escape(name)}</text>')
    out.extend(body)
    out.append("</svg>")
    return "".join(out)


def svg_bars(title: str, y_label: str, bars: Sequence[tuple[str, Sequence[tuple[str, float]], str]],
             colours: Optional[Mapping[str, str]] = None, x_label: str = "job") -> str:
    """Bars (stacked when a bar has several parts): (label under the bar, [(part, value)], tooltip)."""
    colours = dict(colours or {})
    parts = [p for _, stack, _ in bars for p, _ in stack]
    for p in parts:
        colours.setdefault(p, _PALETTE[len(colours) % len(_PALETTE)])
    top = max([sum(max(v, 0.0) for _, v in stack) for _, stack, _ in bars] + [0.0])
    ticks = _ticks(0.0, top or 1.0)
    hi = ticks[-1]
    ph = _H - _MT - _MB
    ymap = lambda v: _MT + ph * (1 - v / hi)  # noqa: E731
    band = (_W - _ML - _MR) / max(1, len(bars))
    every = max(1, math.ceil(len(bars) / 40))
    body = []
    for i, (label, stack, tip) in enumerate(bars):
        x = _ML + i * band + band * 0.15
        w = max(1.0, band * 0.7)
        base = 0.0
        body.append(f'<g class="bar"><title>{escape(tip)}</title>')
        for part, value in stack:
            if value <= 0:
                continue
            y0, y1 = ymap(base + value), ymap(base)
            body.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{max(0.5, y1 - y0):.1f}" '
                        f'fill="{colours[part]}"/>')
            base += value
        body.append("</g>")
        if i % every == 0:
            body.append(f'<text x="{x + w / 2:.1f}" y="{_H - _MB + 14}" text-anchor="middle">{escape(label)}</text>')
    legend = [(p, colours[p]) for p in dict.fromkeys(parts)] if len(set(parts)) > 1 else []
    return _svg_frame(title, y_label, x_label, ticks, ymap, body, legend)


def svg_scatter(title: str, x_label: str, y_label: str, points: Sequence[tuple[float, float, str]]) -> str:
    """Points (x, y, tooltip) and a line through the mean y of each x."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    xt = _ticks(min(xs + [0.0]), max(xs) if xs else 1.0)
    yt = _ticks(0.0, max(ys) if ys else 1.0)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB
    xmap = lambda v: _ML + pw * (v - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    ymap = lambda v: _MT + ph * (1 - (v - yt[0]) / (yt[-1] - yt[0]))  # noqa: E731
    body = [f'<text x="{xmap(t):.1f}" y="{_H - _MB + 14}" text-anchor="middle">{escape(_fmt_tick(t))}</text>'
            for t in xt]
    means: dict[float, list[float]] = {}
    for x, y, _ in points:
        means.setdefault(x, []).append(y)
    line = " ".join(f"{xmap(x):.1f},{ymap(sum(v) / len(v)):.1f}" for x, v in sorted(means.items()))
    body.append(f'<polyline points="{line}" fill="none" stroke="{_PALETTE[1]}" stroke-width="2"/>')
    for x, y, tip in points:
        body.append(f'<circle cx="{xmap(x):.1f}" cy="{ymap(y):.1f}" r="4.5" fill="{_PALETTE[0]}" fill-opacity="0.75">'
                    f'<title>{escape(tip)}</title></circle>')
    return _svg_frame(title, y_label, x_label, yt, ymap, body, [("job", _PALETTE[0]), ("mean", _PALETTE[1])])


def plots(jobs: Sequence[GridJob], keys: Sequence[str]) -> list[str]:
    """The report's SVG plots: s/step against steps (or per job), time per phase, peak memory."""
    out = []
    timed = [j for j in jobs if "s_per_step" in j.metrics]
    tip = lambda j, v: f"job {j.num}: {j.label(keys)}: {v}"  # noqa: E731
    steps = {j.steps for j in timed if j.steps is not None}
    if len(steps) > 1:
        points = [(j.steps, j.metrics["s_per_step"], tip(j, f"{j.steps:g} steps, {j.metrics['s_per_step']:.4g} s/step"))
                  for j in timed if j.steps is not None]
        out.append(svg_scatter("Seconds per denoising step vs steps", "steps", "s / step", points))
    elif timed:
        out.append(svg_bars("Seconds per denoising step, per job", "s / step",
                            [(str(j.num), [("s/step", j.metrics["s_per_step"])],
                              tip(j, f"{j.metrics['s_per_step']:.4g} s/step")) for j in timed]))
    phases = ("load_s", "lora_s", "encode_s", "denoise_s", "decode_s")
    if any(p in j.metrics for j in jobs for p in phases + ("total_s",)):
        bars = []
        for j in jobs:
            stack = [(p[:-2], j.metrics.get(p, 0.0)) for p in phases]
            other = j.metrics.get("total_s", 0.0) - sum(v for _, v in stack)
            stack.append(("other", other if other > 1e-3 else 0.0))
            detail = ", ".join(f"{n} {v:.3g}s" for n, v in stack if v > 0)
            total = j.metrics.get("total_s")
            bars.append((str(j.num), stack, tip(j, f"{j.status}, total {total:.3g} s ({detail})" if total is not None
                                                 else f"{j.status}, {detail or 'no timings'}")))
        out.append(svg_bars("Time per job, by phase", "seconds", bars))
    mem = [j for j in jobs if "peak_mem_mb" in j.metrics]
    if mem:
        colours = {FINISHED: _PALETTE[0], SKIPPED: _PALETTE[7], FAILED: _PALETTE[3], KILLED: _PALETTE[1]}
        out.append(svg_bars("Peak memory per job", "MB",
                            [(str(j.num), [(j.status, j.metrics["peak_mem_mb"])],
                              tip(j, f"{j.status}, peak {j.metrics['peak_mem_mb']:.0f} MB")) for j in mem], colours))
    return out
