"""report.html: one self-contained page (no external resource, a CSP forbids any) with the grid,
the plots and a sortable table of the jobs, written beside the grid PNGs (`write_report`; a
sweep's `PendingReport` draws the grid first); its style and script are report.css and report.js.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageOps

from ..errors import first_line
from ..files import atomic_write, inside
from ..records import INPUTS_DIR, METRICS, input_copy_name
from .axes import Axes, GridPage, axes_name, axis_values, choose_axes, grid_pages, shorten
from .grid import Images, jpeg_uri, read_picture, shown, write_grids
from .jobs import OK_STATUSES, GridJob, keys_in_order, number
from .plots import escape, plots

_CSS = (Path(__file__).parent / "report.css").read_text(encoding="utf-8")
_JS = (Path(__file__).parent / "report.js").read_text(encoding="utf-8")
FULL_PIXELS = 200_000_000  # all full-size copies in report.html together
THUMB_QUALITY, FULL_QUALITY = 85, 90  # JPEG quality of the page's thumbnails and full-size copies
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_METRIC_FORMAT = {"s_per_step": "{:.4f}", "peak_mem_mb": "{:.0f}"}
_COMMON_GEN = (("prompt", "Prompt"), ("negative_prompt", "Negative prompt"), ("model", "Model"), ("steps", "Steps"),
               ("cfg_scale", "CFG"), ("schedule", "Schedule"), ("seed", "Seed"), ("dtype", "dtype"),
               ("device", "Device"))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{max(1, round(n / 2**10))} KB"


def report_html(jobs: Sequence[GridJob], axes: Axes, *, keys: Optional[Sequence[str]] = None, title: str = "",
                overrides: Sequence[str] = (), thumb: int = 256, full_max: int = 2048, full_quality: int = FULL_QUALITY,
                images: Optional[Images] = None, folder: Optional[Path] = None) -> str:
    """The whole report as one HTML document; `folder` (the sweep's): the pictures the jobs read
    are shown from its inputs/ copies."""
    images = images or Images()
    keys = list(keys) if keys is not None else keys_in_order(jobs)
    title = title or "Sweep report"
    # the full-size images, once each; thumbnails point at them by job number
    full_max = _full_max(jobs, full_max)
    embedded = _embed_images(jobs, keys, images, thumb, full_max, full_quality)
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>{escape(title)}</title>", '<link rel="icon" href="data:,">',
           f"<style>{_CSS}</style></head>", f'<body style="--t:{thumb}px">']
    inputs = _inputs_section(jobs, folder, thumb) if folder is not None else []
    out += _header(jobs, axes, keys, title, overrides, bool(inputs))
    out += inputs
    note = escape(f". Click an image for its full size. This file embeds {len(embedded.templates)} images: thumbnails "
              f"(JPEG, at most {thumb} px) and full-size copies (JPEG quality {full_quality}, at most {full_max} px), "
              f"{_size(embedded.nbytes)} in all; the lossless PNGs are the jobs' image.png.")
    out += _grid_section(jobs, axes, keys, thumb, embedded.thumbs, note)
    svgs = plots(jobs, keys)
    out.append('<section id="plots"><h2>Plots</h2>'
               + ("".join(svgs) if svgs else '<p class="note">No timings recorded.</p>')
               + '<p class="note">Hover a bar or point for its job.</p></section>')
    out += _jobs_table(jobs, keys, embedded.thumbs)
    out.append('<figure id="viewer" hidden tabindex="-1" role="dialog" aria-label="full-size image">'
               '<div class="frame"></div><figcaption></figcaption></figure>')
    out.extend(embedded.templates)
    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


@dataclass
class _Embedded:
    templates: list[str]  # <template> holding each full-size image
    thumbs: dict[int, tuple[str, int, int]]  # job number -> (data URI, width, height)
    nbytes: int


def _embed_images(jobs: Sequence[GridJob], keys: Sequence[str], images: Images, thumb: int, full_max: int,
                  full_quality: int) -> _Embedded:
    embedded = _Embedded([], {}, 0)
    for job in jobs:
        picture = images.picture(job, jpegs=_page_jpegs(thumb, full_max, full_quality)) if job.ok else None
        if picture is None:
            continue
        uri, size, width, height = picture.jpegs[(full_max, full_quality)]
        turi, tsize, twidth, theight = picture.jpegs[(thumb, THUMB_QUALITY)]
        embedded.thumbs[job.num] = (turi, twidth, theight)
        embedded.nbytes += size + tsize
        caption = f"job {job.num}: {job.label(keys)} ({job.status}, {picture.width}x{picture.height})"
        embedded.templates.append(
            f'<template id="full-{job.num}" data-caption="{escape(caption)}">'
            f'<img src="{uri}" alt="{escape(caption)}" {_shown_size(width, height, thumb)}></template>')
    return embedded


def _shown_size(width: int, height: int, thumb: int) -> str:
    """The full-size view's size: the image's own, but never smaller than its thumbnail (a small
    image is enlarged with its pixels kept sharp, class `up`); the viewport still limits it."""
    scale = max(1.0, thumb / max(width, height))
    size = f'width="{round(width * scale)}" height="{round(height * scale)}"'
    return size + (' class="up"' if scale > 1 else "")


def _page_jpegs(thumb: int, full_max: int, full_quality: int) -> list[tuple[int, int]]:
    """The JPEGs the page embeds of each image: the thumbnail and the full-size copy."""
    return [(thumb, THUMB_QUALITY), (full_max, full_quality)]


def _full_max(jobs: Sequence[GridJob], full_max: int) -> int:
    """The full-size copies' longest side: all of them stay within FULL_PIXELS (about 50 MB of JPEG)."""
    return _full_max_of(sum(1 for j in jobs if j.ok), full_max)


def _full_max_of(n_images: int, full_max: int) -> int:
    return min(full_max, max(512, int(math.sqrt(FULL_PIXELS / max(1, n_images)))))


def _header(jobs: Sequence[GridJob], axes: Axes, keys: Sequence[str], title: str,
            overrides: Sequence[str], inputs: bool = False) -> list[str]:
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    out = [f"<header><h1>{escape(title)}</h1>"]
    if overrides:
        out.append('<p class="meta">Overrides: ' + " ".join(f"<code>{escape(o)}</code>" for o in overrides) + "</p>")
    out.append('<p class="meta">' + escape(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: "
                                        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items())) + "</p>")
    swept = [k for k in keys if k not in axes.constants]
    if swept:
        out.append('<p class="meta">Swept: ' + " ".join(
            f"<code>{escape(k)}={escape(','.join(axis_values(jobs, k)))}</code>" for k in swept) + "</p>")
    if axes.constants:
        first = jobs[0].values if jobs else {}
        out.append('<p class="meta">Same in every job: ' + " ".join(
            f"<code>{escape(k)}={escape(first.get(k, ''))}</code>" for k in axes.constants) + "</p>")
    common = _common_generation(jobs)
    if common:
        out.append('<p class="meta">' + " &nbsp;·&nbsp; ".join(common) + "</p>")
    out.append('<nav>' + ('<a href="#inputs">Inputs</a>' if inputs else "")
               + '<a href="#grid">Grid</a><a href="#plots">Plots</a><a href="#jobs">Jobs</a></nav></header>')
    return out


def _inputs_section(jobs: Sequence[GridJob], folder: Path, thumb: int) -> list[str]:
    """The pictures the jobs read (control pictures, masks, edit pictures; their PNGs' `inputs`),
    each once with the jobs that read it, from the folder's inputs/ copies (none: no section)."""
    used: dict[tuple[str, str], tuple[str, list[int]]] = {}  # (argument, sha256) -> (file, jobs)
    for job in jobs:
        for arg, items in (job.gen().get("inputs") or {}).items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and item.get("sha256") and item.get("file"):
                    used.setdefault((arg, str(item["sha256"])), (str(item["file"]), []))[1].append(job.num)
    figures = []
    for (arg, sha), (file, nums) in used.items():
        path = inside(folder, Path(INPUTS_DIR) / input_copy_name(sha, file))  # None: a link out of the folder
        if path is None or not path.is_file():
            continue
        full = read_picture(path)
        if full is None:  # not a picture (any more)
            continue
        picture = shown(ImageOps.contain(full, (thumb, thumb), Image.Resampling.LANCZOS))
        uri = jpeg_uri(picture, THUMB_QUALITY)[0]
        who = "every job" if len(nums) == len(jobs) else "job" + ("s " if len(nums) > 1 else " ") + ", ".join(
            map(str, nums))
        caption = f"{arg}: {file} ({who}; sha256 {sha[:12]})"
        figures.append(f'<figure><img src="{uri}" alt="{escape(caption)}" width="{picture.width}" '
                       f'height="{picture.height}"><figcaption>{escape(caption)}</figcaption></figure>')
    if not figures:
        return []
    return ['<section id="inputs"><h2>Input pictures</h2><p class="note">The pictures the jobs read: control '
            'pictures, masks, pictures to edit.</p><div class="inputs">' + "".join(figures) + "</div></section>"]


def _common_generation(jobs: Sequence[GridJob]) -> list[str]:
    """The generation parameters every finished job shares (from the PNGs), as HTML snippets."""
    gens = [j.gen() for j in jobs if j.ok]
    common = []
    for name, label in _COMMON_GEN:
        seen = {str(g.get(name)) for g in gens if name in g}
        if len(seen) == 1 and all(name in g for g in gens):
            value = seen.pop()
            if value:
                common.append(f"<b>{escape(label)}:</b> {escape(value)}")
    return common


def _grid_section(jobs: Sequence[GridJob], axes: Axes, keys: Sequence[str], thumb: int,
                  thumbs: dict[int, tuple[str, int, int]], note: str) -> list[str]:
    axis_text = [f"columns: <code>{escape(axes.x)}</code>" if axes.x else "columns: none",
                 f"rows: <code>{escape(axes.y)}</code>" if axes.y else "rows: none"]
    if axes.pages:
        axis_text.append("one grid per " + ", ".join(f"<code>{escape(k)}</code>" for k in axes.pages))
    out = ['<section id="grid"><h2>Grid</h2><p class="note">' + "; ".join(axis_text) + note + "</p>"]
    for page in grid_pages(jobs, axes):
        if page.values:
            out.append("<h3>" + ", ".join(f"{escape(k)} = {escape(v) or '(unset)'}" for k, v in page.values) + "</h3>")
        out += _grid_table(page, axes, keys, thumb, thumbs)
    out.append("</section>")
    return out


def _grid_table(page: GridPage, axes: Axes, keys: Sequence[str], thumb: int,
                thumbs: dict[int, tuple[str, int, int]]) -> list[str]:
    budget = max(12, thumb // 7)  # characters of a column header (CSS wraps it onto up to 3 lines)
    out = ['<div class="scroll"><table class="grid">']
    if axes.x or axes.y:
        out.append("<thead>")
        if axes.x:
            out.append(f'<tr><th></th><th class="axis" colspan="{len(page.xs)}">{escape(axes.x)}</th></tr>')
        out.append(f'<tr><th class="axis">{escape(axes.y or "")}</th>' + "".join(
            f'<th title="{escape(v)}">{escape(shorten(v, lambda s: len(s) <= 3 * budget, page.xs)) if v else "(unset)"}'
            "</th>" if axes.x else "<th></th>" for v in page.xs) + "</tr></thead>")
    out.append("<tbody>")
    for yv in page.ys:
        label = escape(shorten(yv, lambda s: len(s) <= 60, page.ys)) if yv else ("(unset)" if axes.y else "")
        row = [f'<th title="{escape(yv)}">{label}</th>']
        row += [_grid_cell(page.cells.get((xv, yv)), keys, thumbs) for xv in page.xs]
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def _grid_cell(job: Optional[GridJob], keys: Sequence[str], thumbs: dict[int, tuple[str, int, int]]) -> str:
    if job is None:
        return '<td class="cell missing" title="no job for this combination"></td>'
    if job.num in thumbs:
        uri, w, h = thumbs[job.num]
        tip = f"job {job.num}: {job.label(keys)} ({job.status}"
        tip += f", {job.metrics['total_s']:.2f} s)" if "total_s" in job.metrics else ")"
        return (f'<td class="cell ok"><button type="button" class="thumb" data-job="{job.num}" '
                f'title="{escape(tip)}"><img src="{uri}" alt="{escape(tip)}" width="{w}" height="{h}"></button></td>')
    status = job.status if job.status not in OK_STATUSES else f"{job.status}, no image"
    return (f'<td class="cell bad"><div class="fail {escape(job.status)}" title="{escape(job.error)}">'
            f"<b>{escape(status)} (job {job.num})</b>{escape(first_line(job.error))}</div></td>")


def _jobs_table(jobs: Sequence[GridJob], keys: Sequence[str], thumbs: dict[int, tuple[str, int, int]]) -> list[str]:
    numeric_keys = {k for k in keys if all(number(v) is not None for v in axis_values(jobs, k) if v)}
    show_seed = "seed" not in keys and any(j.seed for j in jobs)
    cols = [("job", "num"), ("status", "text")] + [(k, "num" if k in numeric_keys else "text") for k in keys]
    if show_seed:
        cols.append(("seed", "num"))
    cols += [(m, "num") for m in METRICS] + [("image", "text"), ("error", "text"), ("run_id", "text")]
    out = ['<section id="jobs"><h2>Jobs</h2><p class="note">Click a column to sort by it, again to reverse.</p>'
           '<div class="scroll"><table class="jobs sortable"><thead><tr>'
           + "".join(f'<th data-type="{t}" data-col="{escape(c)}">{escape(c)}</th>' for c, t in cols)
           + "</tr></thead><tbody>"]
    for j in jobs:
        cells = _job_cells(j, keys, numeric_keys, show_seed, thumbs)
        out.append(f'<tr class="job {escape(j.status)}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div></section>")
    return out


def _job_cells(j: GridJob, keys: Sequence[str], numeric_keys: set[str], show_seed: bool,
               thumbs: dict[int, tuple[str, int, int]]) -> list[str]:
    cells = [f'<td class="n" data-v="{j.num}">{j.num}</td>', f"<td>{escape(j.status)}</td>"]
    for k in keys:
        v = j.values.get(k, "")
        cells.append(f'<td class="n" data-v="{escape(v)}">{escape(v)}</td>' if k in numeric_keys
                     else f"<td>{escape(v)}</td>")
    if show_seed:
        sortable = j.seed if number(j.seed) is not None else ""
        cells.append(f'<td class="n" data-v="{escape(sortable)}">{escape(j.seed)}</td>')
    for m in METRICS:
        v = j.metrics.get(m)
        shown = "" if v is None else _METRIC_FORMAT.get(m, "{:.2f}").format(v)
        cells.append(f'<td class="n" data-v="{"" if v is None else repr(float(v))}">{shown}</td>')
    cells.append(f'<td><button type="button" class="view" data-job="{j.num}">view</button></td>'
                 if j.num in thumbs else "<td></td>")
    cells.append(f'<td class="err" title="{escape(j.error)}">{escape(j.error)}</td>')
    cells.append(f"<td><code>{escape(j.run_id)}</code></td>" if j.run_id else "<td></td>")
    return cells


# ------------------------------------------------------------------- the report


@dataclass
class ReportFiles:
    html: Path
    grids: list[Path]

    @property
    def all(self) -> list[Path]:
        return [*self.grids, self.html]


def write_report(jobs: Sequence[GridJob], out_dir: Path, *, keys: Optional[Sequence[str]] = None,
                 x: Optional[str] = None, y: Optional[str] = None, z: Optional[str] = None, thumb: int = 256,
                 title: Optional[str] = None, overrides: Optional[Sequence[str]] = None,
                 full_max: int = 2048, by_axes: bool = False) -> ReportFiles:
    """The grid PNG(s) and report.html in `out_dir`. x/y/z: a swept key, "none" or None (default).
    `by_axes` (a rebuild): the files are named by the axes (`report_x=seed_y=lora.alpha.html`),
    so that a rebuild with other axes leaves the sweep's own and earlier rebuilds' files alone.
    Raises AxisError for an unknown or repeated axis key."""
    pending = PendingReport(jobs, out_dir, keys=keys, x=x, y=y, z=z, thumb=thumb, full_max=full_max,
                            by_axes=by_axes)
    return pending.finish(jobs, title=title, overrides=overrides)


class PendingReport:
    """A report in two steps: the grid PNG(s) when made, report.html by `finish(jobs)`. A sweep
    draws its grid while MLflow still records its last job, and writes the page, which shows
    each job's run, once that is done. The jobs given to `finish` are the same jobs (their runs
    and tracked flags may have changed)."""

    def __init__(self, jobs: Sequence[GridJob], out_dir: Path, *, keys: Optional[Sequence[str]] = None,
                 x: Optional[str] = None, y: Optional[str] = None, z: Optional[str] = None, thumb: int = 256,
                 full_max: int = 2048, by_axes: bool = False, images: Optional[Images] = None) -> None:
        """`images`: the pictures made so far (a sweep's `Pictures`); what they lack is made here."""
        self.keys = list(keys) if keys is not None else getattr(jobs, "keys", None)
        self.out_dir, self.thumb, self.full_max = Path(out_dir), thumb, full_max
        jobs = sorted(jobs, key=lambda j: j.num)
        self.axes = choose_axes(jobs, self.keys, x, y, z)
        self.name = axes_name(self.axes) if by_axes else ""
        self.images = images or Images()
        self.images.prepare(jobs, thumbs=[(thumb, True)],
                            jpegs=_page_jpegs(thumb, _full_max(jobs, full_max), FULL_QUALITY))
        self.grids = write_grids(jobs, self.out_dir, self.axes, thumb, self.images,
                                 axes_name(self.axes, pages=False) if by_axes else "")

    def finish(self, jobs: Sequence[GridJob], title: Optional[str] = None,
               overrides: Optional[Sequence[str]] = None) -> ReportFiles:
        title = title if title is not None else getattr(jobs, "title", "")
        overrides = overrides if overrides is not None else getattr(jobs, "overrides", [])
        text = report_html(sorted(jobs, key=lambda j: j.num), self.axes, keys=self.keys, title=title or "",
                           overrides=overrides, thumb=self.thumb, full_max=self.full_max, images=self.images,
                           folder=self.out_dir)
        html_name = f"report_{self.name}.html" if self.name else "report.html"
        page = atomic_write(self.out_dir / html_name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return ReportFiles(page, self.grids)


class Pictures:
    """A sweep's report pictures, made while its jobs run: as each job ends (`add`), its image is
    decoded once on a background thread into the grid's thumbnail and the page's JPEGs (Pillow's
    codecs release the GIL; on a GPU machine the CPU is otherwise idle meanwhile), so that the
    sweep's end only lays out the grid and the page. `made()` waits for them; a picture that
    could not be made here, or with other sizes (fewer images than planned allow larger
    full-size copies), is made by the PendingReport as before."""

    def __init__(self, planned: int, thumb: int = 256, full_max: int = 2048) -> None:
        self.images = Images()
        self._thumbs = [(thumb, True)]
        self._jpegs = _page_jpegs(thumb, _full_max_of(planned, full_max), FULL_QUALITY)
        self._pool: Optional[ThreadPoolExecutor] = None

    def add(self, num: int, image: Optional[str]) -> None:
        """Job `num` ended with this image (None: without one)."""
        if image is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-report")
        job = GridJob(num, {}, image_path=Path(image))
        self._pool.submit(self.images.picture, job, self._thumbs, self._jpegs)

    def made(self) -> Images:
        """The pictures, once every one asked for is made (or has failed: made again at the end)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return self.images
