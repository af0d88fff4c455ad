"""runner.reporting: the X/Y/Z grid, report.html, `python -m runner report` and the MLflow loader.

Sweep folders are made the way a sweep makes them: `runner.records.save_png` per job and
`runner.records.write_table` for jobs.csv."""
from __future__ import annotations

import csv
import itertools
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from runner.commands import jobs_from_mlflow, report_main
from runner.records import JobRecord, save_png, write_table
from runner.reporting.axes import AxisError, choose_axes, grid_pages, shorten
from runner.reporting.grid import render_page, row_labels
from runner.reporting.html import PendingReport, Pictures, report_html, write_report
from runner.reporting.jobs import GridJob, JobList, jobs_from_records, jobs_from_sweep_dir
from runner.tracking.fetch import split_overrides

REPO = Path(__file__).resolve().parent.parent
EVIL_PROMPT = 'a fox <script>alert("x")</script> & "quotes" \'single\' 🦊'
LONG_PATH = "/home/someone/models/loras/experiments/2024/style_v{}.safetensors"
BASE = ["model=qwen_image_tiny", "sampler=tiny", "lora=file"]


def sample_image(seed: int, alpha: float, steps: int, size=(160, 120)) -> Image.Image:
    """Something to look at: the seed picks the colour, alpha the disc, steps the stripes."""
    im = Image.new("RGB", size, [(70, 110, 170), (170, 90, 60), (80, 150, 90)][seed % 3])
    d = ImageDraw.Draw(im)
    for k in range(int(steps)):
        d.rectangle([0, k * 10, size[0], k * 10 + 3], fill=(235, 235, 235))
    r = 8 + alpha * 40
    d.ellipse([size[0] / 2 - r, size[1] / 2 - r, size[0] / 2 + r, size[1] / 2 + r], fill=(250, 220, 40))
    return im


def make_sweep_dir(root: Path, *, failed=(), killed=(), missing=(), prompt_key=False, path_key=False,
                   size=(160, 120)) -> Path:
    """A 3-key sweep folder (seed=0,1 lora.alpha=0,0.5,1 sampler.steps=2,4: 12 jobs; the job
    numbers in `missing` never ran), plus a 4th key: two prompts, or two long LoRA paths."""
    sweep = root / "multirun" / "2025-01-02" / "03-04-05"
    axes = [("seed", ["0", "1"]), ("lora.alpha", ["0", "0.5", "1"]), ("sampler.steps", ["2", "4"])]
    if prompt_key:
        axes.append(("prompt", ["a red fox in the snow", EVIL_PROMPT]))
    if path_key:
        axes.append(("lora.path", [LONG_PATH.format(1), LONG_PATH.format(2)]))
    records = []
    for num, combo in enumerate(itertools.product(*[vals for _, vals in axes])):
        if num in missing:
            continue
        values = dict(zip([k for k, _ in axes], combo))
        overrides = BASE + [f"{k}={v}" for k, v in values.items()]
        r = JobRecord(num, overrides, status="FINISHED", run_id=f"run{num:02d}", job_dir=sweep / str(num))
        steps = int(values["sampler.steps"])
        r.metrics = {"load_s": 2.0 if num == 0 else 0.0, "lora_s": 0.1, "encode_s": 0.2,
                     "denoise_s": 0.3 * steps + 0.01 * num, "s_per_step": 0.3 + 0.01 * num / steps,
                     "decode_s": 0.25, "total_s": 1.0 + 0.3 * steps + 0.01 * num, "peak_mem_mb": 1000.0 + 10 * num}
        if num in failed or num in killed:
            r.status = "FAILED" if num in failed else "KILLED"
            r.error = ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB <b>not bold</b>\n"
                       "  File x.py, line 3" if num in failed else "interrupted")
            r.metrics = {"total_s": 0.5}
        else:
            gen = {"prompt": values.get("prompt", "a red fox in the snow"), "negative_prompt": "",
                   "seed": int(values["seed"]), "steps": steps, "cfg_scale": 4.0, "width": size[0],
                   "height": size[1], "schedule": "model", "model": "qwen_image_tiny",
                   "loras": [["file", float(values["lora.alpha"])]]}
            r.image_path = save_png(sample_image(int(values["seed"]), float(values["lora.alpha"]), steps, size),
                                    sweep / str(num) / "image.png", gen)
        records.append(r)
    write_table(records, sweep / "jobs.csv")
    swept = ",".join
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n" + "".join(
            f"    - '{o}'\n" for o in BASE + [f"{k}={swept(v)}" for k, v in axes if k != "prompt"]))
    return sweep


def job(num, status="FINISHED", image=None, error="", **values) -> GridJob:
    return GridJob(num, {k.replace("__", "."): str(v) for k, v in values.items()}, status, image, {}, error)


# ------------------------------------------------------------------------- axes


def test_default_axes_most_values_first_then_sweep_order():
    jobs = [job(i, seed=s, lora__alpha=a, sampler__steps=st)
            for i, (s, a, st) in enumerate(itertools.product([0, 1], [0, 0.5, 1], [2, 4]))]
    axes = choose_axes(jobs, ["seed", "lora.alpha", "sampler.steps"])
    assert (axes.x, axes.y, axes.z, axes.pages) == ("lora.alpha", "seed", "sampler.steps", ["sampler.steps"])


def test_axes_can_be_named_or_switched_off_and_bad_keys_list_the_swept_keys():
    jobs = [job(i, seed=s, lora__alpha=a, sampler__steps=st)
            for i, (s, a, st) in enumerate(itertools.product([0, 1], [0, 0.5, 1], [2, 4]))]
    keys = ["seed", "lora.alpha", "sampler.steps"]
    axes = choose_axes(jobs, keys, x="seed", y="sampler.steps", z="lora.alpha")
    assert (axes.x, axes.y, axes.pages) == ("seed", "sampler.steps", ["lora.alpha"])
    axes = choose_axes(jobs, keys, x="none")  # the defaults fill y and z
    assert (axes.x, axes.y, axes.pages) == (None, "lora.alpha", ["seed"] + ["sampler.steps"])
    with pytest.raises(AxisError, match="unknown key 'cfg'.*seed, lora.alpha, sampler.steps"):
        choose_axes(jobs, keys, y="cfg")
    with pytest.raises(AxisError, match="two axes"):
        choose_axes(jobs, keys, x="seed", y="seed")


def test_numeric_values_sort_numerically_others_keep_the_sweep_order():
    jobs = [job(i, cfg=v, sampler=w) for i, (v, w) in enumerate(
        [("10", "tiny"), ("2", "default"), ("1.5", "lightning"), ("-1", "tiny"), ("1e-3", "default")])]
    axes = choose_axes(jobs, ["cfg", "sampler"])
    page, = grid_pages(jobs, axes)
    assert page.xs == ["-1", "1e-3", "1.5", "2", "10"]
    assert page.ys == ["tiny", "default", "lightning"]


def test_one_page_per_z_value_with_the_same_columns_and_rows(tmp_path):
    sweep = make_sweep_dir(tmp_path, missing={11})  # the last combination never ran
    jobs = jobs_from_sweep_dir(sweep)
    axes = choose_axes(jobs, jobs.keys)
    pages = grid_pages(jobs, axes)
    assert [p.filename for p in pages] == ["grid_sampler.steps=2.png", "grid_sampler.steps=4.png"]
    assert [p.title for p in pages] == ["sampler.steps=2", "sampler.steps=4"]
    assert all(p.xs == ["0", "0.5", "1"] and p.ys == ["0", "1"] for p in pages)
    assert len(pages[0].cells) == 6 and len(pages[1].cells) == 5
    sizes = {render_page(p, axes, thumb=64).size for p in pages}
    assert len(sizes) == 1  # pages line up


def test_failed_cells_are_grey_and_missing_ones_empty(tmp_path):
    sweep = make_sweep_dir(tmp_path, failed={2}, killed={4}, missing={6})
    jobs = jobs_from_sweep_dir(sweep)
    axes = choose_axes(jobs, jobs.keys, x="lora.alpha", y="seed", z="sampler.steps")
    page = grid_pages(jobs, axes)[0]  # steps=2: jobs 0 2 4 6 8 10
    sheet = render_page(page, axes, thumb=96)
    for num in (2, 4):
        x0, y0, x1, y1 = page.boxes[num]
        assert sheet.getpixel((x1 - 2, y1 - 2)) == (200, 200, 200)
        assert job_text_pixels(sheet, page.boxes[num]) > 50  # status + error are written there
    x0, y0, x1, y1 = page.boxes[0]  # a finished job shows its image (a blue-ish background)
    r, g, b = sheet.getpixel((x0 + 3, (y0 + y1) // 2))
    assert b > r
    assert 6 not in page.boxes and ("0", "1") not in page.cells  # job 6 = seed 1, alpha 0: never ran
    x0, y0 = page.boxes[0][0], page.boxes[8][1]  # the column of alpha 0, the row of seed 1
    assert sheet.getpixel((x0 + 48, y0 + 48)) == (255, 255, 255)


def test_transparent_pixels_show_the_checkerboard_in_the_grid_and_the_page(tmp_path):
    """An RGBA image (Qwen-Image 2.1's): the grid cell and the page's JPEG copy show its transparent
    half over 8-pixel light/mid grey squares (not the colour stored under alpha 0); image.png keeps its alpha."""
    import base64
    import io

    import numpy as np

    from runner.reporting.grid import Images, write_grids

    pixels = np.zeros((64, 128, 4), np.uint8)
    pixels[:, :64] = (200, 30, 30, 255)  # the left half opaque red
    pixels[:, 64:] = (0, 255, 0, 0)  # the right half transparent, green under alpha 0
    gen = {"prompt": "p", "negative_prompt": "", "seed": 0, "steps": 2, "cfg_scale": 1.0, "width": 128, "height": 64,
           "model": "qwen_image_2_1_tiny", "loras": []}
    path = save_png(Image.fromarray(pixels, "RGBA"), tmp_path / "0" / "image.png", gen)
    with Image.open(path) as saved:
        assert saved.mode == "RGBA" and np.array_equal(np.asarray(saved), pixels)
    jobs = [job(0, seed=0, image=path), job(1, seed=1, image=path)]
    axes = choose_axes(jobs, ["seed"])
    page, = grid_pages(jobs, axes)
    render_page(page, axes, thumb=64, images=Images())  # where the cells are
    [grid] = write_grids(jobs, tmp_path, axes, thumb=64)  # the 128x64 image as a 64x32 thumbnail
    sheet = Image.open(grid).convert("RGB")
    x0, y0, _, _ = page.boxes[0]
    y0 += 16  # centred in its cell
    for u, v in [(40, 0), (47, 0), (48, 0), (40, 8), (63, 31), (50, 17)]:  # the transparent half, from its corner
        grey = 204 if (u // 8 + v // 8) % 2 == 0 else 153
        assert sheet.getpixel((x0 + u, y0 + v)) == (grey,) * 3, (u, v, sheet.getpixel((x0 + u, y0 + v)))
    assert sheet.getpixel((x0 + 10, y0 + 10)) == (200, 30, 30)

    text = report_html(jobs, axes, keys=["seed"], thumb=64)
    uri = re.search(r'<template id="full-0"[^>]*><img src="data:image/jpeg;base64,([^"]+)"', text).group(1)
    copy = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"), np.int16)
    assert copy.shape == (64, 128, 3)
    for u, v in [(70, 2), (77, 2), (80, 2), (70, 13), (125, 61)]:
        grey = 204 if (u // 8 + v // 8) % 2 == 0 else 153
        assert np.abs(copy[v, u] - grey).max() <= 12, (u, v, copy[v, u])  # JPEG: near the square's grey


def job_text_pixels(sheet: Image.Image, box) -> int:
    import numpy as np

    crop = np.asarray(sheet.crop(box).convert("RGB"))
    return int((crop != 200).any(axis=-1).sum())


def test_labels_keep_the_part_that_differs():
    a, b = LONG_PATH.format(2), LONG_PATH.format(1)
    for width in (36, 24, 16):
        short = shorten(a, lambda s: len(s) <= width, [a, b])
        assert len(short) <= width and short.startswith("…") and "2" in short, short
    assert shorten(a, lambda s: len(s) <= 30, [a, b]) == "…/2024/style_v2.safetensors"
    assert shorten("short", lambda s: len(s) <= 30, ["short", "other"]) == "short"
    p1 = "a photo of a cat, highly detailed, masterpiece, best quality, 8k"
    short = shorten(p1, lambda s: len(s) <= 20, [p1, p1.replace("cat", "dog")])
    assert "cat" in short and len(short) <= 20
    alone = shorten("x" * 10 + "MIDDLE" + "y" * 10, lambda s: len(s) <= 12)
    assert alone.startswith("x") and alone.endswith("y") and "…" in alone


def test_long_values_are_shortened_in_the_png_headers(tmp_path):
    sweep = make_sweep_dir(tmp_path, path_key=True)
    jobs = jobs_from_sweep_dir(sweep)
    axes = choose_axes(jobs, jobs.keys, x="lora.path", y="seed", z="sampler.steps")
    assert axes.pages == ["sampler.steps", "lora.alpha"]  # the fourth key makes pages too
    page = grid_pages(jobs, axes)[0]
    sheet = render_page(page, axes, thumb=128)
    assert sheet.width < 2 * 128 + 400  # the long paths did not widen the columns
    html_text = report_html(jobs, axes, keys=jobs.keys, thumb=64)
    assert re.search(r'<th title="[^"]+style_v2\.safetensors">…[^<]*/style_v2\.safetensors</th>', html_text)
    assert f'title="{LONG_PATH.format(2)}"' in html_text  # the full value on hover


@pytest.mark.parametrize("thumb", [64, 128, 256, 512])
def test_a_row_title_that_fits_is_drawn_whole(tmp_path, thumb):
    """The row header's column is as wide as its longest label: `lora.alpha` is never cut."""
    jobs = jobs_from_sweep_dir(make_sweep_dir(tmp_path))
    axes = choose_axes(jobs, jobs.keys, x="seed", y="lora.alpha", z="sampler.steps")
    width, title, labels = row_labels(grid_pages(jobs, axes)[0], axes, thumb)
    assert (title, labels) == ("lora.alpha", ["0", "0.5", "1"]) and width > 0


def test_one_key_sweep_is_one_row(tmp_path):
    records = []
    for num, seed in enumerate([0, 1, 2]):
        r = JobRecord(num, BASE + [f"seed={seed}"], status="FINISHED", run_id=f"r{num}")
        r.image_path = save_png(sample_image(seed, 0.5, 2), tmp_path / str(num) / "image.png",
                                {"prompt": "p", "negative_prompt": "", "seed": seed, "steps": 2, "cfg_scale": 1,
                                 "width": 160, "height": 120, "schedule": "model", "model": "m"})
        records.append(r)
    jobs = jobs_from_records(records)
    axes = choose_axes(jobs, jobs.keys)
    assert (axes.x, axes.y, axes.pages) == ("seed", None, [])
    page, = grid_pages(jobs, axes)
    assert page.filename == "grid.png" and page.ys == [""] and page.xs == ["0", "1", "2"]
    files = write_report(jobs, tmp_path, thumb=64)
    assert [p.name for p in files.grids] == ["grid.png"]
    with Image.open(files.grids[0]) as im:
        assert im.width > 3 * 64 > im.height - 64


def test_four_key_sweep_extra_keys_become_pages(tmp_path):
    sweep = make_sweep_dir(tmp_path, prompt_key=True)
    jobs = jobs_from_sweep_dir(sweep)
    assert jobs.keys == ["seed", "lora.alpha", "sampler.steps", "prompt"] and len(jobs) == 24
    axes = choose_axes(jobs, jobs.keys)
    assert (axes.x, axes.y, axes.pages) == ("lora.alpha", "seed", ["sampler.steps", "prompt"])
    pages = grid_pages(jobs, axes)
    assert len(pages) == 4 and all(len(p.cells) == 6 for p in pages)
    assert pages[1].values == [("sampler.steps", "2"), ("prompt", EVIL_PROMPT)]
    files = write_report(jobs, sweep, thumb=48)
    names = sorted(p.name for p in files.grids)
    assert len(names) == 4 and all(re.fullmatch(r"grid_[A-Za-z0-9._=+,-]+\.png", n) for n in names), names
    # z=none: the third and fourth keys still make pages; a rebuild leaves the earlier files
    again = write_report(jobs, sweep, thumb=48, x="seed", y="lora.alpha", z="none", by_axes=True)
    assert len(again.grids) == 4 and all(p.name.startswith("grid_x=seed_y=lora.alpha_") for p in again.grids)
    assert again.html.name == "report_x=seed_y=lora.alpha_z=sampler.steps+prompt.html"
    assert sorted(p.name for p in sweep.glob("grid*.png")) == sorted(p.name for p in files.grids + again.grids)


def test_the_report_has_every_job_and_escapes_user_strings(tmp_path):
    sweep = make_sweep_dir(tmp_path, prompt_key=True, failed={3})
    jobs = jobs_from_sweep_dir(sweep)
    files = write_report(jobs, sweep, thumb=48)
    text = files.html.read_text(encoding="utf-8")
    assert text.count("<script") == 1 and 'alert("x")' not in text  # only ours; the prompt is text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text and "🦊" in text
    assert "<b>not bold</b>" not in text and "&lt;b&gt;not bold&lt;/b&gt;" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text

    tree = Collector()
    tree.feed(text)
    rows = [a for tag, a in tree.tags if tag == "tr" and "job" in a.get("class", "").split()]
    assert len(rows) == len(jobs) == 24
    assert sorted(tree.attr_values("template", "id")) == sorted(f"full-{j.num}" for j in jobs if j.num != 3)
    run_ids = {c for c in re.findall(r"<code>(run\d\d)</code>", text)}
    assert run_ids == {j.run_id for j in jobs}
    assert "FAILED (job 3)" in text and "OutOfMemoryError: CUDA out of memory" in text
    svg_titles = re.findall(r'<svg class="plot"[^>]*aria-label="([^"]+)"', text)
    assert svg_titles == ["Seconds per denoising step vs steps", "Time per job, by phase", "Peak memory per job"]
    assert "Overrides:" in text and "<code>lora.alpha=0,0.5,1</code>" in text  # from multirun.yaml


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def attr_values(self, tag, name):
        return [a[name] for t, a in self.tags if t == tag and name in a]


def test_pictures_made_as_the_jobs_end_give_the_same_report(tmp_path):
    """A sweep makes each job's thumbnail and page images as the job ends (Pictures: a background
    thread, while the next job runs); its report is the one made from the images at the end. A
    picture not made by then (a job added late, an image that is not there) is made at the end."""
    sweep = make_sweep_dir(tmp_path, failed={3})
    jobs = jobs_from_sweep_dir(sweep)
    plain = write_report(jobs, tmp_path / "plain", thumb=48)
    late = jobs[5]
    pictures = Pictures(len(jobs), thumb=48)
    for job in jobs:
        if job.ok and job is not late:
            pictures.add(job.num, str(job.image_path))
    pictures.add(99, str(tmp_path / "nowhere.png"))
    images = pictures.made()
    hidden = tmp_path / "hidden"
    shutil.move(sweep, hidden)  # the pictures were made before: they need the images no more
    ours = [j for j in jobs if j.ok]
    assert all(images.thumb(j, 48) is not None for j in ours if j is not late) and images.thumb(late, 48) is None
    shutil.move(hidden, sweep)
    early = PendingReport(jobs, tmp_path / "early", thumb=48, images=images).finish(jobs)
    assert early.html.read_text(encoding="utf-8") == plain.html.read_text(encoding="utf-8")
    assert [p.read_bytes() for p in early.grids] == [p.read_bytes() for p in plain.grids]


def test_steps_that_do_not_vary_plot_seconds_per_step_per_job():
    jobs = [GridJob(i, {"seed": str(i)}, metrics={"s_per_step": 0.5 + i, "peak_mem_mb": 100.0, "total_s": 3.0})
            for i in range(3)]
    text = report_html(jobs, choose_axes(jobs), keys=["seed"])
    assert re.findall(r'<svg class="plot"[^>]*aria-label="([^"]+)"', text) == [
        "Seconds per denoising step, per job", "Time per job, by phase", "Peak memory per job"]


def test_full_size_copies_are_capped_so_the_report_stays_small(tmp_path, monkeypatch):
    import runner.reporting.html as compare

    jobs = []
    for i in range(3):
        path = tmp_path / str(i) / "image.png"
        path.parent.mkdir()
        sample_image(i, 0.5, 2, size=(1000, 800)).save(path)
        jobs.append(GridJob(i, {"seed": str(i)}, image_path=path))
    monkeypatch.setattr(compare, "FULL_PIXELS", 3 * 700 * 700)
    text = report_html(jobs, choose_axes(jobs), keys=["seed"], thumb=64)
    assert re.findall(r'<template id="full-\d"[^>]*><img [^>]*width="(\d+)" height="(\d+)"', text) == [("700",
                                                                                                        "560")] * 3
    assert "at most 700 px" in text and "3 images" in text


# ------------------------------------------------------------------- the command


def test_report_command_on_a_sweep_folder(tmp_path, capsys):
    """A rebuild writes files named by its axes and never replaces or deletes the sweep's own
    files or those of a rebuild with other axes; the same axes again replace only their own."""
    sweep = make_sweep_dir(tmp_path, failed={5}, missing={9})
    (sweep / "grid.png").write_bytes(b"the sweep's grid")
    (sweep / "report.html").write_text("the sweep's report")
    assert report_main([str(sweep), "thumb=64"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["grid_x=lora.alpha_y=seed_sampler.steps=2.png",
                                               "grid_x=lora.alpha_y=seed_sampler.steps=4.png",
                                               "report_x=lora.alpha_y=seed_z=sampler.steps.html"]
    text = Path(printed[-1]).read_text(encoding="utf-8")
    assert text.count('class="thumb"') == 10  # 11 jobs ran, 1 failed
    with Image.open(printed[0]) as im:
        assert im.width > 3 * 64
    first = {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file()}

    assert report_main([str(sweep), "x=seed", "y=sampler.steps", "z=none", "thumb=48"]) == 0
    other = [Path(p).name for p in capsys.readouterr().out.split()]
    assert other == [f"grid_x=seed_y=sampler.steps_lora.alpha={a}.png" for a in ("0", "0.5", "1")] + [
        "report_x=seed_y=sampler.steps_z=lora.alpha.html"]
    assert all((sweep / name).read_bytes() == data for name, data in first.items())  # nothing replaced or deleted
    assert report_main([str(sweep), "thumb=64"]) == 0  # the first axes again: their own files, replaced
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == sorted([*first, *other])

    # the folder moved elsewhere: jobs.csv's image paths are relative, <job>/image.png is used
    moved = shutil.copytree(sweep, tmp_path / "moved")
    shutil.rmtree(sweep)
    assert report_main([str(moved), "x=seed", "y=sampler.steps", "z=none", "thumb=48"]) == 0
    assert "outside" not in capsys.readouterr().err
    assert (moved / other[-1]).read_text(encoding="utf-8").count('class="thumb"') == 10


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no sweep folder"),
    (["{empty}"], "has no jobs.csv"),
    (["{sweep}", "x=cfg"], "unknown key 'cfg' for x=: the swept keys are seed, lora.alpha, sampler.steps"),
    (["{sweep}", "thumb=big"], "thumb='big'"),
    (["{sweep}", "colour=red"], "unexpected argument 'colour=red'"),
    ([], "usage:"),
])
def test_report_command_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    places = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "sweep": make_sweep_dir(tmp_path)}
    places["empty"].mkdir()
    assert report_main([a.format(**places) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (places["sweep"] / "report.html").exists()


def test_python_m_runner_report_dispatches(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runner", "report", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "report: no sweep folder" in proc.stderr, proc.stderr


def test_jobs_csv_round_trip_matches_the_records(tmp_path):
    sweep = make_sweep_dir(tmp_path, failed={1})
    jobs = jobs_from_sweep_dir(sweep)
    rows = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert [j.num for j in jobs] == [int(r["job"]) for r in rows]
    j1 = jobs[1]
    assert j1.values == {"seed": "0", "lora.alpha": "0", "sampler.steps": "4"} and j1.status == "FAILED"
    assert j1.image_path is None and j1.metrics == {"total_s": 0.5} and j1.error.startswith("OutOfMemoryError")
    assert jobs[0].image_path == sweep / "0" / "image.png" and jobs[0].seed == "0"
    assert jobs[0].gen()["steps"] == 2 and jobs[0].metrics["load_s"] == 2.0
    assert jobs.title == "Sweep 2025-01-02/03-04-05"


def test_split_overrides_keeps_values_with_spaces():
    assert split_overrides("model=tiny prompt=a red fox seed=1 +x.y=2 ~z") == [
        "model=tiny", "prompt=a red fox", "seed=1", "+x.y=2", "~z"]


# ------------------------------------------------------------------------ MLflow


@pytest.fixture(scope="module")
def mlflow_sweep(tmp_path_factory):
    """A parent run and 4 children in a real SQLite store: seed=0,1 x alpha=0,1; job 2 failed."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow_compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("compare", artifact_location=(root / "artifacts").as_uri())
    overrides = "model=qwen_image_tiny prompt=a red fox seed=0,1 lora.alpha=0,1"
    parent = c.create_run(exp, run_name="sweep 2025-01-02 03-04-05",
                          tags={"runner.kind": "sweep", "runner.overrides": overrides}).info.run_id
    for num, (seed, alpha) in enumerate(itertools.product([0, 1], [0, 1])):
        ov = f"model=qwen_image_tiny prompt=a red fox seed={seed} lora.alpha={alpha}"
        run = c.create_run(exp, run_name=f"seed={seed} lora.alpha={alpha}", tags={
            "mlflow.parentRunId": parent, "runner.kind": "job", "runner.job_num": str(num),
            "runner.overrides": ov}).info.run_id
        params = {"seed": str(seed), "lora.alpha": str(alpha), "prompt": "a red fox", "model.name": "tiny"}
        for k, v in params.items():
            c.log_param(run, k, v)
        if num == 2:
            c.set_tag(run, "runner.error", "RuntimeError: <boom>")
            c.log_metric(run, "total_s", 0.25)
            c.set_terminated(run, "FAILED")
            continue
        c.log_metric(run, "total_s", 1.5 + num)
        c.log_metric(run, "peak_mem_mb", 900.0)
        c.log_metric(run, "not_a_timing", 7.0)
        png = save_png(sample_image(seed, alpha, 3), root / "src" / str(num) / "image.png",
                       {"prompt": "a red fox", "negative_prompt": "", "seed": seed, "steps": 3, "cfg_scale": 4,
                        "width": 160, "height": 120, "schedule": "model", "model": "tiny"})
        c.log_artifact(run, str(png))
        c.set_terminated(run, "FINISHED")
    c.set_terminated(parent, "FAILED")
    return uri, c, parent, root


def test_jobs_from_mlflow_round_trip(mlflow_sweep, tmp_path):
    uri, c, parent, _ = mlflow_sweep
    jobs = jobs_from_mlflow(uri, parent, tmp_path / "dl")
    assert jobs.keys == ["seed", "lora.alpha"]  # no runner.swept_keys tag: the differing overrides
    assert [j.num for j in jobs] == [0, 1, 2, 3]
    assert [j.values for j in jobs] == [{"seed": s, "lora.alpha": a} for s in "01" for a in "01"]
    assert [j.status for j in jobs] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert jobs[2].image_path is None and jobs[2].error == "RuntimeError: <boom>"
    assert jobs[0].metrics == {"total_s": 1.5, "peak_mem_mb": 900.0}
    assert jobs[3].image_path == tmp_path / "dl" / "3" / "image.png" and jobs[3].gen()["seed"] == 1
    assert jobs.title == "sweep 2025-01-02 03-04-05" and jobs.overrides == [
        "model=qwen_image_tiny", "prompt=a red fox", "seed=0,1", "lora.alpha=0,1"]
    files = write_report(jobs, tmp_path / "out", thumb=48)
    assert [p.name for p in files.grids] == ["grid.png"]
    text = files.html.read_text(encoding="utf-8")
    assert text.count('class="thumb"') == 3 and "RuntimeError: &lt;boom&gt;" in text


def test_jobs_from_mlflow_uses_the_parents_swept_keys_tag(mlflow_sweep, tmp_path):
    uri, c, parent, _ = mlflow_sweep
    c.set_tag(parent, "runner.swept_keys", "lora.alpha")
    try:
        jobs = jobs_from_mlflow(uri, parent, tmp_path)
    finally:
        c.delete_tag(parent, "runner.swept_keys")
    assert jobs.keys == ["lora.alpha"] and [j.values for j in jobs] == [{"lora.alpha": a} for a in "0101"]


def test_jobs_from_mlflow_without_overrides_tags_uses_differing_params(mlflow_sweep, tmp_path):
    uri, c, parent, _ = mlflow_sweep
    children = c.search_runs([c.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    saved = {r.info.run_id: r.data.tags["runner.overrides"] for r in children}
    for run_id in saved:
        c.delete_tag(run_id, "runner.overrides")
    try:
        jobs = jobs_from_mlflow(uri, parent, tmp_path)
    finally:
        for run_id, text in saved.items():
            c.set_tag(run_id, "runner.overrides", text)
    assert sorted(jobs.keys) == ["lora.alpha", "seed"] and jobs[1].values["lora.alpha"] == "1"


def test_jobs_from_mlflow_unknown_run_is_a_report_error(mlflow_sweep, tmp_path):
    from runner.reporting.jobs import ReportError

    uri = mlflow_sweep[0]
    with pytest.raises(ReportError, match="no MLflow run"):
        jobs_from_mlflow(uri, "0" * 32, tmp_path)


def test_jobs_from_records_match_the_job_table(tmp_path):
    records = [JobRecord(0, BASE + ["seed=0", "prompt=a b c"], status="FINISHED", run_id="a"),
               JobRecord(1, BASE + ["seed=1", "prompt=a b c"], status="FAILED", run_id="b", error="x")]
    jobs = jobs_from_records(records, overrides=["seed=0,1"], title="t")
    assert isinstance(jobs, JobList) and jobs.keys == ["seed"] and jobs.overrides == ["seed=0,1"]
    assert [(j.num, j.values, j.status, j.error) for j in jobs] == [(0, {"seed": "0"}, "FINISHED", ""),
                                                                    (1, {"seed": "1"}, "FAILED", "x")]


def test_the_report_reads_images_with_the_libraries_one_reader(tmp_path, caplog):
    """A folder's image.png goes through pipelines.open_picture like every input: a 16-bit grey
    image is scaled (not clipped to white), a decompression bomb leaves its cell empty with a
    warning naming the file, the grid and page are still written."""
    import numpy as np

    from runner.reporting.grid import write_grids
    from tests.support.pictures import png_declaring

    deep = tmp_path / "0" / "image.png"
    deep.parent.mkdir()
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(deep)  # mid grey in 16 bits (I;16)
    bomb = tmp_path / "1" / "image.png"
    bomb.parent.mkdir()
    bomb.write_bytes(png_declaring(30000, 30000))
    jobs = [job(0, seed=0, image=deep), job(1, seed=1, image=bomb)]
    axes = choose_axes(jobs, ["seed"])
    page, = grid_pages(jobs, axes)
    with caplog.at_level("WARNING"):
        [grid] = write_grids(jobs, tmp_path, axes, thumb=32)
        text = report_html(jobs, axes, keys=["seed"], thumb=32)
    render_page(page, axes, thumb=32)
    x0, y0, _, _ = page.boxes[0]
    cell = Image.open(grid).convert("RGB").getpixel((x0 + 16, y0 + 16))
    assert all(abs(c - 128) <= 1 for c in cell), cell  # 32768/65535 of white, not 255
    assert "30000x30000" in caplog.text and str(bomb) in caplog.text
    assert 'id="full-0"' in text and 'id="full-1"' not in text
