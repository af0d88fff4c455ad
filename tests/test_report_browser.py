"""report.html in a real headless Chromium (Playwright driving Debian's `chromium`): it loads
from disk without errors or requests, every image decodes, the job table sorts, a thumbnail opens
the full-size image, and the same holds inside a sandboxed iframe like MLflow's artifact viewer.

Skipped only when the Python package `playwright` or the `chromium` executable is absent, and
failed instead with CI=true (`.ci/run` installs both); any other problem fails."""
from __future__ import annotations

from pathlib import Path

import pytest

from runner.reporting.html import write_report
from runner.reporting.jobs import jobs_from_sweep_dir
from tests.conftest import chromium
from tests.test_compare import EVIL_PROMPT, make_sweep_dir

pytestmark = pytest.mark.needs("chromium")
CHROMIUM = chromium()

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FULL = (200, 150)  # the jobs' image size; thumbnails are 64 px
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A 4-key sweep (the 4th key: a prompt with <script>, quotes and an emoji), job 3 failed,
    job 9 never ran."""
    sweep = make_sweep_dir(tmp_path_factory.mktemp("browser"), prompt_key=True, failed={3}, missing={9}, size=FULL)
    return write_report(jobs_from_sweep_dir(sweep), sweep, thumb=64).html


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page that records console errors, uncaught exceptions, failed requests and any request
    that leaves the file (the report must need none)."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        self.page.on("request", lambda r: r.url.startswith(("http:", "https:", "ws:", "wss:"))
                     and self.problems.append(f"network request: {r.url}"))

    def close(self):
        self.context.close()


@pytest.fixture()
def watched(browser):
    w = Watched(browser)
    yield w
    w.close()


def open_report(watched: Watched, report: Path):
    page = watched.page
    page.goto(report.as_uri(), wait_until="load")
    page.wait_for_selector("table.jobs tbody tr")
    return page


def column(scope, name: str) -> list[str]:
    """The cells of the job table's column `name`, in row order."""
    return scope.locator("table.jobs").evaluate(
        """(t, name) => {
            const i = Array.from(t.tHead.rows[0].cells).findIndex(th => th.dataset.col === name);
            return Array.from(t.tBodies[0].rows, r => r.cells[i].textContent.trim());
        }""", name)


def all_images_decoded(scope) -> list[dict]:
    return scope.evaluate(
        "() => Array.from(document.images, im => ({src: im.src.slice(0, 30), complete: im.complete, "
        "w: im.naturalWidth}))")


def test_report_loads_from_disk_without_errors_and_every_image_decodes(watched, report):
    page = open_report(watched, report)
    images = all_images_decoded(page)
    assert len(images) == 22  # 24 combinations, 1 never ran, 1 failed (full-size images wait in <template>s)
    assert all(im["complete"] and im["w"] > 0 for im in images), images
    assert page.locator("table.jobs tbody tr").count() == 23
    assert page.locator("svg.plot").count() == 3
    # the prompt is text, not markup: no alert, and it reads back as typed
    assert EVIL_PROMPT in page.locator("table.jobs").inner_text()
    assert watched.problems == []


def test_clicking_a_column_header_sorts_numerically_and_a_second_click_reverses(watched, report):
    page = open_report(watched, report)
    before = column(page, "total_s")
    values = [float(v) for v in before]
    assert values != sorted(values)  # job order: not already sorted by time
    page.locator('table.jobs th[data-col="total_s"]').click()
    page.wait_for_selector('table.jobs th[data-col="total_s"][aria-sort="ascending"]')
    asc = [float(v) for v in column(page, "total_s")]
    assert asc == sorted(values)
    assert column(page, "job")[0] == "3"  # the failed job was quickest
    page.locator('table.jobs th[data-col="total_s"]').click()
    page.wait_for_selector('table.jobs th[data-col="total_s"][aria-sort="descending"]')
    assert [float(v) for v in column(page, "total_s")] == sorted(values, reverse=True)
    # numeric, not text: 2 before 10 (a text sort would give 0 1 10 11 ... 2)
    page.locator('table.jobs th[data-col="job"]').click()
    page.wait_for_selector('table.jobs th[data-col="job"][aria-sort="ascending"]')
    nums = [int(v) for v in column(page, "job")]
    assert nums == sorted(nums) and nums[:3] == [0, 1, 2] and nums[-1] == 23
    assert watched.problems == []


def test_clicking_a_thumbnail_shows_the_full_size_image(watched, report):
    page = open_report(watched, report)
    viewer = page.locator("#viewer")
    assert viewer.is_hidden()
    thumb = page.locator('button.thumb[data-job="4"]')
    thumb_width = thumb.locator("img").evaluate("im => im.naturalWidth")
    assert thumb_width == 64
    thumb.click()
    full = page.locator("#viewer img")
    full.wait_for(state="visible")
    assert full.evaluate("im => im.complete && im.naturalWidth") == FULL[0]
    assert full.evaluate("im => im.naturalHeight") == FULL[1]
    assert "job 4" in page.locator("#viewer figcaption").inner_text()
    page.keyboard.press("Escape")
    viewer.wait_for(state="hidden")
    # the job table's "view" button opens the same image
    page.locator('table.jobs button.view[data-job="7"]').click()
    page.locator("#viewer img").wait_for(state="visible")
    assert "job 7" in page.locator("#viewer figcaption").inner_text()
    page.locator("#viewer").click()
    viewer.wait_for(state="hidden")
    assert watched.problems == []


def test_report_works_in_a_sandboxed_iframe_like_mlflows_artifact_viewer(watched, report, tmp_path):
    """MLflow shows an HTML artifact as `<iframe sandbox="allow-scripts" src="blob:...">`."""
    host = tmp_path / "host.html"
    host.write_text("<!doctype html><meta charset=utf-8><title>host</title><body></body>")
    page = watched.page
    page.goto(host.as_uri(), wait_until="load")
    page.evaluate(
        """html => new Promise(done => {
            const f = document.createElement('iframe');
            f.setAttribute('sandbox', 'allow-scripts');
            f.style.width = '1200px'; f.style.height = '800px';
            f.src = URL.createObjectURL(new Blob([html], {type: 'text/html'}));
            f.addEventListener('load', () => done());
            document.body.appendChild(f);
        })""", report.read_text(encoding="utf-8"))
    frame = next(f for f in page.frames if f != page.main_frame)
    frame.wait_for_selector("table.jobs tbody tr")
    images = all_images_decoded(frame)
    assert images and all(im["complete"] and im["w"] > 0 for im in images)
    frame.locator('table.jobs th[data-col="peak_mem_mb"]').click()
    frame.wait_for_selector('table.jobs th[data-col="peak_mem_mb"][aria-sort="ascending"]')
    mem = [float(v) for v in column(frame, "peak_mem_mb") if v]
    assert mem == sorted(mem) and len(mem) == 22
    frame.locator('button.thumb[data-job="0"]').click()
    frame.locator("#viewer img").wait_for(state="visible")
    assert frame.locator("#viewer img").evaluate("im => im.naturalWidth") == FULL[0]
    assert watched.problems == []


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> Path:
    """A sweep whose images (48x36) are smaller than the grid's thumbnails (64 px)."""
    sweep = make_sweep_dir(tmp_path_factory.mktemp("small"), size=(48, 36))
    return write_report(jobs_from_sweep_dir(sweep), sweep, thumb=64).html


def test_the_full_size_view_of_a_small_image_is_never_smaller_than_its_thumbnail(watched, small_images):
    page = open_report(watched, small_images)
    thumb = page.locator('button.thumb[data-job="0"] img')
    shown = thumb.bounding_box()
    assert thumb.evaluate("im => im.naturalWidth") == 48 and shown["width"] == 64  # the grid enlarges it
    thumb.click()
    full = page.locator("#viewer img")
    full.wait_for(state="visible")
    box = full.bounding_box()
    assert full.evaluate("im => im.naturalWidth") == 48
    assert (box["width"], box["height"]) == (64, 48)  # as large as in the grid, its shape kept
    assert full.evaluate("im => getComputedStyle(im).imageRendering") == "pixelated"  # pixels, not a blur
    assert watched.problems == []


def test_the_job_table_scrolls_inside_a_box_that_fits_the_window(watched, report):
    """At 1280x900 the page never scrolls sideways, and the job table's box (its scroll bars)
    fits the window: a wide or long table scrolls inside it."""
    page = open_report(watched, report)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    box = page.locator("#jobs .scroll")
    size = box.bounding_box()
    assert size["width"] <= 1280 and size["height"] <= 900, size
    inner = box.evaluate("b => [b.scrollWidth, b.clientWidth, b.scrollHeight, b.clientHeight]")
    assert inner[0] > inner[1] or inner[2] > inner[3]  # this table is larger than its box: it scrolls there
    assert watched.problems == []
