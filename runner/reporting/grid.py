"""The grid as PNG pages: each job's thumbnail in its cell, a grey cell with the status and the
error's first line for a job without an image, the axes' labels; images decoded once for the
grid and the page (`Images`).
"""
from __future__ import annotations

import base64
import io
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..errors import first_line
from ..files import atomic_write
from ..records import FAILED, GRID_PNG_LEVEL, KILLED
from .axes import ELLIPSIS, Axes, GridPage, grid_pages, shorten
from .jobs import OK_STATUSES, GridJob

logger = logging.getLogger("runner")

GREY, MISSING_EDGE, BACKDROP = (200, 200, 200), (215, 215, 215), (240, 240, 240)
STATUS_COLOURS = {FAILED: (170, 0, 0), KILLED: (170, 90, 0)}
# transparent pixels are shown over a checkerboard of light and mid grey squares of 8 pixels (as
# image editors show them), drawn at the size the picture is shown: the same squares in every cell
CHECKER, CHECKER_GREYS = 8, (204, 153)


def _font(size: int):
    """DejaVu Sans when the system has it (accents, symbols), else Pillow's own font."""
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Word-wrapped into at most `max_lines` lines (a word wider than a line is broken); a cut
    text ends with an ellipsis."""
    words = text.split()
    lines: list[str] = []
    line, i = "", 0
    while i < len(words) and len(lines) < max_lines:
        trial = f"{line} {words[i]}" if line else words[i]
        if draw.textlength(trial, font=font) <= width:
            line, i = trial, i + 1
        elif line:
            lines.append(line)
            line = ""
        else:  # a word wider than the line
            word = words[i]
            n = len(word) - 1
            while n > 1 and draw.textlength(word[:n], font=font) > width:
                n -= 1
            lines.append(word[:n])
            words[i] = word[n:]
    truncated = i < len(words) or (bool(line) and len(lines) >= max_lines)
    if line and len(lines) < max_lines:
        lines.append(line)
    if truncated and lines:
        last = lines[-1]
        while last and draw.textlength(last + ELLIPSIS, font=font) > width:
            last = last[:-1]
        lines[-1] = last + ELLIPSIS
    return lines


def render_page(page: GridPage, axes: Axes, thumb: int = 256, images: Optional[Images] = None) -> Image.Image:
    """One grid page as an image; fills `page.boxes` with each job's cell."""
    images = images or Images()
    size = label_size(thumb)
    font, small, big = _font(size), _font(max(11, size - 3)), _font(round(size * 1.25))
    line_h = size + max(4, size // 3)
    pad = max(4, thumb // 32)
    gap = max(4, thumb // 40)
    ncols, nrows = len(page.xs), len(page.ys)
    grid_w = ncols * thumb + (ncols - 1) * gap
    row_w, y_title, y_labels = row_labels(page, axes, thumb)
    left = pad + (row_w + pad if axes.y else 0)
    width = left + grid_w + pad
    top = pad
    title = page.title
    title_h = round(size * 1.25) + pad if title else 0
    top += title_h
    key_line = line_h if axes.x else 0
    value_line = line_h if (axes.x or axes.y) else 0
    top += key_line + value_line
    height = top + nrows * thumb + (nrows - 1) * gap + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    fits = lambda f, w: (lambda s: draw.textlength(s, font=f) <= w)  # noqa: E731
    if title:
        draw.text((pad, pad), shorten(title, fits(big, width - 2 * pad)), fill="black", font=big)
    y_keys = pad + title_h
    if axes.x:
        label = shorten(axes.x, fits(font, grid_w))
        draw.text((left + (grid_w - draw.textlength(label, font=font)) / 2, y_keys), label, fill=(90, 90, 90),
                  font=font)
        for j, value in enumerate(page.xs):
            text = shorten(value or "(unset)", fits(font, thumb), page.xs)
            x0 = left + j * (thumb + gap)
            draw.text((x0 + (thumb - draw.textlength(text, font=font)) / 2, y_keys + key_line), text, fill="black",
                      font=font)
    if axes.y:
        draw.text((pad, y_keys + key_line), y_title, fill=(90, 90, 90), font=font)
        for i, text in enumerate(y_labels):
            y0 = top + i * (thumb + gap)
            draw.text((pad, y0 + (thumb - size) / 2), text, fill="black", font=font)
    page.boxes = {}
    for i, yv in enumerate(page.ys):
        for j, xv in enumerate(page.xs):
            x0, y0 = left + j * (thumb + gap), top + i * (thumb + gap)
            job = page.cells.get((xv, yv))
            if job is not None:
                page.boxes[job.num] = (x0, y0, x0 + thumb - 1, y0 + thumb - 1)
            _draw_cell(sheet, draw, job, (x0, y0), thumb, images, (font, small), size, pad, line_h)
    return sheet


def label_size(thumb: int) -> int:
    """The grid's text size for cells of `thumb` pixels."""
    return max(12, min(32, round(thumb / 14)))


def row_labels(page: GridPage, axes: Axes, thumb: int) -> tuple[int, str, list[str]]:
    """The grid's row header: its column's width (as wide as its longest label within bounds,
    rounded up: a label that fits is drawn whole), the rows' key and each row's value, shortened
    only where they do not fit."""
    if not axes.y:
        return 0, "", []
    size = label_size(thumb)
    font, draw = _font(size), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    want = max([draw.textlength(v or "(unset)", font=font) for v in page.ys] + [draw.textlength(axes.y, font=font)])
    width = math.ceil(min(max(want, 3 * size), max(thumb, 12 * size)))
    fits = lambda s: draw.textlength(s, font=font) <= width  # noqa: E731
    return width, shorten(axes.y, fits), [shorten(v or "(unset)", fits, page.ys) for v in page.ys]


def _draw_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, job: Optional[GridJob], origin: tuple[int, int],
               thumb: int, images: Images, fonts: tuple, size: int, pad: int, line_h: int) -> None:
    """A job's thumbnail; a grey cell with the status and the error's first line; or an
    outline where the sweep had no job."""
    x0, y0 = origin
    box = (x0, y0, x0 + thumb - 1, y0 + thumb - 1)
    if job is None:
        draw.rectangle(box, outline=MISSING_EDGE)
        return
    im = images.thumb(job, thumb) if job.ok else None
    if im is not None:
        draw.rectangle(box, fill=BACKDROP)
        sheet.paste(im, (x0 + (thumb - im.width) // 2, y0 + (thumb - im.height) // 2))
        return
    font, small = fonts
    draw.rectangle(box, fill=GREY)
    status = job.status if job.status not in OK_STATUSES else f"{job.status}, no image"
    colour = STATUS_COLOURS.get(job.status, (70, 70, 70))
    width = thumb - 2 * pad
    draw.text((x0 + pad, y0 + pad), shorten(f"{status} (job {job.num})", lambda t: draw.textlength(t, font=font)
                                            <= width), fill=colour, font=font)
    small_h = max(11, size - 3) + 4
    room = max(1, (thumb - 2 * pad - line_h) // small_h)
    for k, line in enumerate(_wrap(draw, first_line(job.error), small, width, room)):
        draw.text((x0 + pad, y0 + pad + line_h + k * small_h), line, fill=(40, 40, 40), font=small)


def read_picture(path: Path) -> Optional[Image.Image]:
    """A picture of the folder read as the library reads every picture (pipelines.open_picture:
    EXIF orientation, high bit depths scaled, the pixel limit checked before decoding), RGBA when
    it has transparency; None, with a warning naming the file, when it cannot be read."""
    from pipelines import PictureError, open_picture  # imports torch: only once a report reads pictures

    try:
        return open_picture(path, "picture", alpha=True)
    except (OSError, PictureError) as error:
        logger.warning("Left out of the report: %s (%s)", path, first_line(error))
        return None


def checkerboard(size: tuple[int, int]) -> Image.Image:
    """An RGBA checkerboard of `size` (CHECKER-pixel squares, light grey at the top left)."""
    cols, rows = -(-size[0] // CHECKER), -(-size[1] // CHECKER)
    squares = Image.new("L", (cols, rows))
    squares.putdata([CHECKER_GREYS[(x + y) % 2] for y in range(rows) for x in range(cols)])
    board = squares.resize((cols * CHECKER, rows * CHECKER), Image.Resampling.NEAREST)
    return board.crop((0, 0, *size)).convert("RGBA")


def shown(im: Image.Image) -> Image.Image:
    """What the grid and the page show of a picture (RGB or RGBA, read_picture): an RGBA one over
    the checkerboard, so that transparent pixels look transparent (a JPEG has no alpha)."""
    if im.mode != "RGBA":
        return im if im.mode == "RGB" else im.convert("RGB")
    board = checkerboard(im.size)
    board.alpha_composite(im)
    return board.convert("RGB")


@dataclass
class _Picture:
    """What the grid and the page show of one job's image, all made from one decode."""

    width: int
    height: int
    thumbs: dict[tuple[int, bool], Image.Image]  # (size, upscale) -> thumbnail
    jpegs: dict[tuple[int, int], tuple[str, int, int, int]]  # (longest side, quality) -> (URI, bytes, w, h)


class Images:
    """Each job's image decoded once; the thumbnails and the page's JPEGs come from that decode
    and are kept, the full-size pixels are not (a big sweep does not pile up in memory).
    `prepare` makes them for many jobs on a few threads: Pillow's codecs release the GIL, and at
    a sweep's end the cores are otherwise idle."""

    def __init__(self) -> None:
        self._pictures: dict[int, Optional[_Picture]] = {}

    def prepare(self, jobs: Sequence[GridJob], thumbs: Sequence[tuple[int, bool]] = (),
                jpegs: Sequence[tuple[int, int]] = ()) -> None:
        todo = [j for j in jobs if j.ok]
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
            for job, picture in zip(todo, pool.map(lambda j: self._make(j, thumbs, jpegs), todo)):
                self._pictures[job.num] = picture

    def _make(self, job: GridJob, thumbs: Sequence[tuple[int, bool]], jpegs: Sequence[tuple[int, int]]
              ) -> Optional[_Picture]:
        picture = self._pictures.get(job.num)
        missing_thumbs = [t for t in thumbs if picture is None or t not in picture.thumbs]
        missing_jpegs = [j for j in jpegs if picture is None or j not in picture.jpegs]
        if job.num in self._pictures and not missing_thumbs and not missing_jpegs:
            return picture
        full = self._open(job)
        if full is None:
            return None
        picture = picture or _Picture(full.width, full.height, {}, {})
        for size, upscale in missing_thumbs:  # resized with their alpha, then shown over the checkerboard
            picture.thumbs[(size, upscale)] = shown(
                ImageOps.contain(full, (size, size), Image.Resampling.LANCZOS)
                if upscale or full.width > size or full.height > size else full)
        for longest, quality in missing_jpegs:
            copy = shown(full if max(full.size) <= longest else ImageOps.contain(full, (longest, longest),
                                                                                Image.Resampling.LANCZOS))
            picture.jpegs[(longest, quality)] = (*jpeg_uri(copy, quality), copy.width, copy.height)
        return picture

    @staticmethod
    def _open(job: GridJob) -> Optional[Image.Image]:
        if job.image_path is None or not Path(job.image_path).is_file():
            return None
        return read_picture(Path(job.image_path))

    def picture(self, job: GridJob, thumbs: Sequence[tuple[int, bool]] = (),
                jpegs: Sequence[tuple[int, int]] = ()) -> Optional[_Picture]:
        picture = self._make(job, thumbs, jpegs)
        self._pictures[job.num] = picture
        return picture

    def thumb(self, job: GridJob, size: int, upscale: bool = True) -> Optional[Image.Image]:
        picture = self.picture(job, thumbs=[(size, upscale)])
        return picture.thumbs[(size, upscale)] if picture is not None else None


def write_grids(jobs: Sequence[GridJob], out_dir: Path, axes: Axes, thumb: int = 256,
                images: Optional[Images] = None, name: str = "") -> list[Path]:
    """The grid page(s) as PNG files in `out_dir`: `grid.png` / `grid_<page>.png`, or with a
    `name` (a rebuild's axes, axes_name without the pages) `grid_x=X_y=Y.png` /
    `grid_x=X_y=Y_<page>.png` (the page names its keys). A file of the same name is replaced
    atomically; nothing else is touched."""
    out_dir = Path(out_dir)
    images = images or Images()
    written = []
    for page in grid_pages(jobs, axes):
        filename = page.filename if not name else f"grid_{name}{page.filename[len('grid'):]}"
        sheet = render_page(page, axes, thumb, images)
        written.append(atomic_write(out_dir / filename,
                                    lambda tmp, s=sheet: s.save(tmp, format="PNG", compress_level=GRID_PNG_LEVEL)))
    return written


def jpeg_uri(im: Image.Image, quality: int) -> tuple[str, int]:
    """A JPEG data URI of `im`, and its size in bytes."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    data = buf.getvalue()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), len(data)
