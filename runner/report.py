"""What a job and a sweep leave behind besides MLflow: the PNG with its generation
parameters, the sweep's contact sheet and its table of jobs."""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

METRICS = ("load_s", "lora_s", "encode_s", "denoise_s", "s_per_step", "decode_s", "total_s", "peak_mem_mb")


# ------------------------------------------------------------------------ the PNG


def parameters_text(gen: dict[str, Any]) -> str:
    """The A1111-style `parameters` text that image viewers and tools read."""
    loras = ", ".join(f"{label}:{alpha:g}" for label, alpha in gen.get("loras", [])) or "none"
    return (
        f"{gen['prompt']}\n"
        f"Negative prompt: {gen['negative_prompt']}\n"
        f"Steps: {gen['steps']}, CFG scale: {gen['cfg_scale']}, Seed: {gen['seed']}, "
        f"Size: {gen['width']}x{gen['height']}, Sampler: {gen.get('sampler')}, Model: {gen['model']}, "
        f"LoRAs: {loras}"
    )


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` beside `path`, then rename: a crash never leaves a truncated file under
    the final name, and a failed write leaves no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_png(image: Image.Image, path: Path, gen: dict[str, Any]) -> Path:
    """Save with two text chunks: `parameters` (human-readable) and `generation` (JSON)."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(gen))
    info.add_text("generation", json.dumps(gen, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_generation(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text["generation"])


# ------------------------------------------------------------------------- sweeps


@dataclass
class JobRecord:
    num: int
    overrides: list[str]
    status: str = "RUNNING"  # FINISHED | FAILED | KILLED | SKIPPED
    run_id: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)
    image_path: Optional[Path] = None
    error: str = ""
    job_dir: Optional[Path] = None


def swept_keys(records: Sequence[JobRecord]) -> list[str]:
    """Override keys whose value differs between jobs, in the order of the first job."""
    values: dict[str, set[str]] = {}
    order: list[str] = []
    for r in records:
        for key, value in (_split(o) for o in r.overrides):
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    return [k for k in order if len(values[k]) > 1] if len(records) > 1 else order


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def label_of(record: JobRecord, keys: Sequence[str]) -> list[str]:
    wanted = dict(_split(o) for o in record.overrides)
    return [f"{k}={wanted.get(k, '')}" for k in keys] or [f"job {record.num}"]


def contact_sheet(records: Sequence[JobRecord], thumb: int = 256) -> Image.Image:
    """One grid image of the sweep: a cell per job, labelled by its swept values; a failed
    job is a grey cell saying so. Columns follow the last swept key (Hydra varies it fastest),
    so a 2-key sweep reads as a table."""
    keys = swept_keys(records)
    n = max(1, len(records))
    cols = len({dict(_split(o) for o in r.overrides).get(keys[-1]) for r in records}) if keys else n
    if cols < 2 or cols > 8:
        cols = min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    font = _font(max(10, thumb // 18))
    line_h = font.getbbox("Ay")[3] + 4
    label_lines = max(1, len(keys)) + 1  # swept values + status/time
    cell_w, cell_h = thumb + 8, thumb + 8 + label_lines * line_h
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, record in enumerate(records):
        x0, y0 = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        image = None
        if record.image_path is not None and Path(record.image_path).is_file():
            with Image.open(record.image_path) as im:
                image = ImageOps.contain(im.convert("RGB"), (thumb, thumb))
        if image is None:
            draw.rectangle([x0, y0, x0 + thumb - 1, y0 + thumb - 1], fill=(200, 200, 200))
            draw.text((x0 + 8, y0 + thumb // 2 - line_h), record.status, fill=(160, 0, 0), font=font)
        else:
            sheet.paste(image, (x0 + (thumb - image.width) // 2, y0 + (thumb - image.height) // 2))
        lines = label_of(record, keys)
        total = record.metrics.get("total_s")
        status = record.status if total is None else f"{record.status} {total:.2f}s"
        for j, text in enumerate(lines + [status]):
            draw.text((x0, y0 + thumb + 2 + j * line_h), _fit(draw, text, font, thumb), fill="black", font=font)
    return sheet


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_table(records: Sequence[JobRecord], path: Path) -> Path:
    """A CSV row per job: number, status, MLflow run, swept values, overrides, metrics,
    image, error."""
    keys = swept_keys(records)
    header = ["job", "status", "run_id", *keys, "overrides", *METRICS, "image", "error"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for r in records:
                wanted = dict(_split(o) for o in r.overrides)
                writer.writerow(
                    [r.num, r.status, r.run_id or "", *(wanted.get(k, "") for k in keys), " ".join(r.overrides)]
                    + [_fmt(r.metrics.get(m)) for m in METRICS]
                    + [str(r.image_path or ""), r.error]
                )

    return atomic_write(path, write)


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.6g}"
