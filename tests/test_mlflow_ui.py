"""MLflow's own UI (a real `mlflow ui` on 127.0.0.1, driven by a headless Chromium) opened as the
README says, on a store the runner's recording functions wrote: it lands on the runs list
("Model training"), not the GenAI overview, with the sweep's parent run and its children nested.
Skipped when playwright or chromium is absent, failed instead with CI=true (CI installs both)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import chromium
from .processes import start_mlflow

pytestmark = pytest.mark.needs("chromium")
CHROMIUM = chromium()

def _sweep_store(tmp: Path) -> tuple[str, str, list[str]]:
    """A sweep of 2 jobs logged by runner.tracking.runs' functions (the same calls as a real sweep)."""
    from PIL import Image

    from runner.records import FINISHED, JobRecord, SweepRecord
    from runner.tracking.runs import log_job, log_sweep_end, start_sweep_run
    from runner.tracking.store import Tracker

    spec = SimpleNamespace(uri=None, store_dir=str(tmp / "store"), artifact_location=None, request_timeout_s=5,
                           request_retries=0)
    tracker = Tracker(spec, "qwen-image")
    sweep = SweepRecord(name="sweep 12-00-00 seed=0,1", overrides=["seed=0,1"], params={"seed": "0,1"},
                        started=time.time(), tags={"runner.kind": "sweep"})
    sweep.parent_run_id = start_sweep_run(tracker, sweep, {})
    names = []
    for seed in (0, 1):
        image = tmp / f"{seed}.png"
        Image.new("RGB", (32, 32), (200 * seed, 80, 120)).save(image)
        record = JobRecord(num=seed, overrides=[f"seed={seed}"], status=FINISHED, image_path=str(image),
                           name=f"seed={seed}", params={"seed": seed}, metrics={"total_s": 1.0 + seed},
                           tracking={"image_key": "image"}, started=time.time(), ended=time.time())
        run_id = tracker.start_run(record.name, {}, parent_id=sweep.parent_run_id)
        log_job(tracker, record, run_id, sweep.parent_run_id)
        names.append(record.name)
    sweep.status, sweep.ended = FINISHED, time.time()
    log_sweep_end(tracker, sweep, [])
    return tracker.uri, sweep.name, names


@pytest.fixture()
def mlflow_ui(tmp_path):
    uri, parent, children = _sweep_store(tmp_path)
    proc, url = start_mlflow("ui", ["--backend-store-uri", uri], tmp_path)
    try:
        yield url, parent, children
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_mlflow_ui_opens_on_the_runs_list_with_the_sweep_nested(mlflow_ui):
    from playwright import sync_api

    url, parent, children = mlflow_ui
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)  # the README's clicks: Model training, Experiments, the experiment
        page.get_by_text("Model training", exact=True).first.click()
        page.get_by_text("Experiments", exact=True).first.click()
        page.get_by_text("qwen-image", exact=True).first.click()
        row = page.locator("[role=row]", has_text=parent).first
        row.wait_for(timeout=60_000)
        assert "/runs" in page.url and "overview" not in page.url  # the runs view, not GenAI's overview
        # the parent's expander is drawn once the list knows the parent has children: only then
        # does "no child row" mean they are nested (before, it could mean not drawn yet)
        expander = row.get_by_role("button").first
        expander.wait_for(timeout=30_000)
        sync_api.expect(page.get_by_text(children[0], exact=True)).to_have_count(0)
        expander.click()
        for name in children:
            sync_api.expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=30_000)
        browser.close()
