"""The grid's axes: which swept key runs along the columns, the rows and the pages
(`choose_axes`), the pages and their cells (`grid_pages`), and labels shortened where they agree
with their siblings (`shorten`); docs/report.md.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .jobs import GridJob, ReportError, keys_in_order, number

NONE = "none"  # an axis switched off
ELLIPSIS = "…"


class AxisError(ReportError):
    """An axis key the sweep does not sweep, or a key on two axes."""


def axis_values(jobs: Sequence[GridJob], key: str) -> list[str]:
    """The distinct values of `key`: numerically sorted when all are numbers, else in the order
    of the sweep; an empty value (a job without the key) last."""
    seen: list[str] = []
    for job in jobs:
        v = job.values.get(key, "")
        if v not in seen:
            seen.append(v)
    present = [v for v in seen if v != ""]
    if present and all(number(v) is not None for v in present):
        present.sort(key=lambda v: number(v))
    return present + ([""] if "" in seen else [])


@dataclass
class Axes:
    x: Optional[str]
    y: Optional[str]
    pages: list[str]  # z first, then any further swept keys
    constants: list[str]  # keys with one value in every job

    @property
    def z(self) -> Optional[str]:
        return self.pages[0] if self.pages else None


def choose_axes(jobs: Sequence[GridJob], keys: Optional[Sequence[str]] = None, x: Optional[str] = None,
                y: Optional[str] = None, z: Optional[str] = None) -> Axes:
    """x / y / z: a swept key, "none" (no such axis) or None (the default from the sweep)."""
    keys = list(keys) if keys is not None else keys_in_order(jobs)
    asked = {"x": x, "y": y, "z": z}
    named: list[str] = []
    for axis, key in asked.items():
        if key is None or key == NONE:
            continue
        if key not in keys:
            raise AxisError(f"unknown key {key!r} for {axis}=: {not_swept_hint(key, keys)}")
        if key in named:
            raise AxisError(f"{key!r} is on two axes: give each axis its own key (or none)")
        named.append(key)
    counts = {k: len(axis_values(jobs, k)) for k in keys}
    constants = [k for k in keys if counts[k] < 2 and k not in named]
    free = sorted((k for k in keys if k not in named and k not in constants), key=lambda k: -counts[k])
    chosen = {}
    for axis in ("x", "y", "z"):
        if asked[axis] is None:
            chosen[axis] = free.pop(0) if free else None
        else:
            chosen[axis] = None if asked[axis] == NONE else asked[axis]
    pages = ([chosen["z"]] if chosen["z"] else []) + free
    return Axes(chosen["x"], chosen["y"], pages, constants)


def not_swept_hint(key: str, keys: Sequence[str]) -> str:
    """`did you mean ...? the swept keys are ...` for an axis key the sweep does not sweep."""
    if not keys:
        return "the sweep sweeps no key (every job has the same overrides)"
    close = difflib.get_close_matches(key, list(keys), n=1)
    return (f"did you mean `{close[0]}`? " if close else "") + "the swept keys are " + ", ".join(keys)


@dataclass
class GridPage:
    values: list[tuple[str, str]]  # the page's (key, value)s: z first
    xs: list[str]  # column values ([""] when x is none)
    ys: list[str]  # row values ([""] when y is none)
    cells: dict[tuple[str, str], GridJob]  # (x value, y value) -> job
    filename: str
    boxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # job -> cell box in the PNG

    @property
    def title(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values)


def grid_pages(jobs: Sequence[GridJob], axes: Axes) -> list[GridPage]:
    """One page per combination (that ran) of the page keys; every page has the columns and
    rows of the whole sweep, so pages line up."""
    xs = axis_values(jobs, axes.x) if axes.x else [""]
    ys = axis_values(jobs, axes.y) if axes.y else [""]
    combos: list[tuple[str, ...]] = []
    by_page: dict[tuple[str, ...], list[GridJob]] = {}
    for job in jobs:
        combo = tuple(job.values.get(k, "") for k in axes.pages)
        if combo not in by_page:
            by_page[combo] = []
            combos.append(combo)
        by_page[combo].append(job)
    orders = [axis_values(jobs, k) for k in axes.pages]
    combos.sort(key=lambda c: tuple(order.index(v) for order, v in zip(orders, c)))
    pages, names = [], set()
    for combo in combos:
        cells = {}
        for job in sorted(by_page[combo], key=lambda j: j.num):  # a rerun: the later job wins
            cells[(job.values.get(axes.x, "") if axes.x else "", job.values.get(axes.y, "") if axes.y else "")] = job
        values = list(zip(axes.pages, combo))
        name = _page_filename(values, names)
        names.add(name)
        pages.append(GridPage(values, xs, ys, cells, name))
    return pages or [GridPage([], xs, ys, {}, "grid.png")]


def _page_filename(values: Sequence[tuple[str, str]], taken: set[str]) -> str:
    """`grid_<key>=<value>[_<key>=<value>...].png`, safe as a file name; a long or colliding name
    gets a short hash of the full one."""
    if not values:
        return "grid.png"
    raw = "_".join(f"{k}={v}" for k, v in values)
    safe = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", raw).strip("-.") or "page"
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    if len(safe) > 100:
        safe = f"{safe[:90]}-{digest}"
    if f"grid_{safe}.png" in taken:
        safe = f"{safe}-{digest}"
    return f"grid_{safe}.png"


# ------------------------------------------------------------------------- labels


def shorten(text: str, fits: Callable[[str], bool], siblings: Sequence[str] = ()) -> str:
    """`text` if it fits, else shortened where it agrees with its siblings (the other values of
    the same axis), so what tells it apart stays visible: first the shared left part goes
    (`…/loras/style_v2.safetensors`, cut at a separator when possible), then the shared right
    part, then the middle of what is left."""
    if fits(text):
        return text
    others = [s for s in siblings if s != text]
    if others:
        start = min(_common_prefix(text, s) for s in others)
        tail = min(_common_prefix(text[::-1], s[::-1]) for s in others)
        end = max(start, len(text) - tail)
    else:  # alone: a path keeps its file name, anything else its two ends
        cut = max(text.rfind("/"), text.rfind("\\"))
        start, end = (cut + 1 if cut > 0 else 0), len(text)
    start = min(start, max(0, len(text) - 1))  # keep at least the last character
    # 1. drop the left, at most up to where the difference starts: the longest tail that fits,
    #    moved to a separator (before a slash, after a space/_/-/.) if one is near
    fitting = next((i for i in range(1, start + 1) if fits(ELLIPSIS + text[i:])), None)
    if fitting is not None:
        near = [i for i in range(fitting, min(start, fitting + 12) + 1)
                if text[i] in "/\\" or text[i - 1] in " _-.:,"]
        return ELLIPSIS + text[near[0] if near else fitting:]
    # 2. keep the differing part, drop from the right
    head = ELLIPSIS if start > 0 else ""
    for j in range(len(text) - 1, end - 1, -1):
        candidate = head + text[start:j] + ELLIPSIS
        if fits(candidate):
            return candidate
    # 3. the differing part alone is too long: its two ends, more of the end
    core = text[start:end]
    for keep in range(len(core) - 1, 0, -1):
        a = keep // 3
        b = keep - a
        candidate = head + core[:a] + ELLIPSIS + core[len(core) - b:] + (ELLIPSIS if end < len(text) else "")
        if fits(candidate):
            return candidate
    return ELLIPSIS


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


def axes_name(axes: Axes, pages: bool = True) -> str:
    """A rebuild's files are named by its axes: `x=seed_y=lora.alpha[_z=sampler.steps]`."""
    raw = f"x={axes.x or NONE}_y={axes.y or NONE}" + (f"_z={'+'.join(axes.pages)}" if axes.pages and pages else "")
    safe = re.sub(r"[^A-Za-z0-9._=+,-]+", "-", raw)
    return safe if len(safe) <= 100 else f"{safe[:90]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
