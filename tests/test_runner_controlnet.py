"""The `controlnet` group end to end, in `python -m runner` subprocesses on the embedded tiny model: the
offline demo (`controlnet=tiny_demo`: a tiny Blockwise ControlNet and its edge map built on first use) swept
over controlnet.scale against a real SQLite MLflow store (one load; the control picture's sha256 in each PNG and
run, the picture itself once on the parent run and in the sweep folder, where the report shows it), and a
control picture that is not there refused before any weight is read."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .processes import runner_env

SMALL = ["model=qwen_image_tiny", "sampler=tiny", "sampler.height=64", "sampler.width=64", "sampler.steps=2",
         "progress_bar=false", "device=cpu", "prompt=a red fox in the snow"]

pytestmark = pytest.mark.slow


def runner(tmp_path, *args: str) -> subprocess.CompletedProcess:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "runner", *args, f"tracking.store_dir={tmp_path / 'store'}",
            f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    return subprocess.run(argv, cwd=tmp_path, env=runner_env(models), capture_output=True, text=True, timeout=400)


def test_demo_sweep_over_the_scale_loads_once_and_records_the_control_picture(tmp_path):
    from mlflow import MlflowClient

    from runner.records import read_generation

    proc = runner(tmp_path, "-m", *SMALL, "controlnet=tiny_demo", "controlnet.scale=0,1", "experiment=cn")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert log.count("Loading qwen_image_tiny with the ControlNet tiny_demo") == 1, log[-3000:]
    built = tmp_path / "models" / "tiny" / "Qwen-Image-Tiny-ControlNet"
    assert {"edges.png", "model.safetensors"} <= {p.name for p in built.iterdir()}  # built on first use
    digest = hashlib.sha256((built / "edges.png").read_bytes()).hexdigest()

    sweep = tmp_path / "sweep"
    images = {}
    for num, scale in ((0, 0.0), (1, 1.0)):
        png = sweep / str(num) / "image.png"
        gen = read_generation(png)
        assert gen["inputs"] == {"controlnet_inputs.image": [{"file": "edges.png", "sha256": digest}]}
        assert gen["controlnet"] == {"name": "tiny_demo", "conditions": [
            {"controlnet_id": 0, "image": "edges.png", "scale": scale, "start": 1.0, "end": 0.0}]}
        with Image.open(png) as im:
            assert f"ControlNet: tiny_demo edges.png:{scale:g}" in im.info["parameters"]
            images[scale] = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(images[0.0] - images[1.0]).mean() > 3  # the net acts at scale 1, not at 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cn").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("runner.kind") == "job"]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {ch.data.params["controlnet.scale"] for ch in children} == {"0.0", "1.0"}
    for ch in children:
        p = ch.data.params
        assert ch.info.status == "FINISHED" and p["inputs.controlnet_inputs.image.0.sha256"] == digest
        assert p["controlnet.name"] == "tiny_demo" and p["controlnet.image"].endswith("edges.png")
        assert not client.list_artifacts(ch.info.run_id, "inputs")
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "inputs")] == ["inputs/edges.png"]

    kept = sweep / "inputs" / f"{digest[:12]}-edges.png"
    assert kept.read_bytes() == (built / "edges.png").read_bytes()
    report = (sweep / "report.html").read_text()
    assert f"controlnet_inputs.image: edges.png (every job; sha256 {digest[:12]})" in report
    assert json.loads((sweep / "0" / "job.json").read_text())["inputs"][0]["sha256"] == digest

    # `report --run`: the folder fetched from MLflow gets the picture from the parent run, and shows it too
    from runner.reporting.html import write_report
    from runner.reporting.jobs import jobs_from_sweep_dir
    from runner.tracking.fetch import fetch_sweep

    fetched = fetch_sweep(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", parent.info.run_id, tmp_path / "fetched")
    assert (fetched.folder / "inputs" / kept.name).read_bytes() == kept.read_bytes()
    page = write_report(jobs_from_sweep_dir(fetched.folder), fetched.folder).html.read_text()
    assert f"controlnet_inputs.image: edges.png (every job; sha256 {digest[:12]})" in page


def test_a_control_picture_that_is_not_there_is_refused_before_loading(tmp_path):
    proc = runner(tmp_path, *SMALL, "controlnet=tiny_demo", f"controlnet.image={tmp_path / 'edgez.png'}",
                  "tracking=none")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "controlnet.image" in text and "edgez.png" in text and "Fix:" in text
    assert "Loading" not in text and not (tmp_path / "run").exists()


def test_what_only_the_loaded_net_can_refuse_fails_the_job_at_the_conditions_key(tmp_path, monkeypatch, tiny_repo):
    """A mask for the demo's canny-layout net: which kind the net is shows only once it is loaded, so the job
    fails (recorded, the sweep would go on), with the pipeline's message at the condition's config key."""
    from hydra import compose, initialize_config_dir

    from runner.build import pipeline as build
    from runner.config import CONF_DIR
    from runner.config.schema import register_configs
    from runner.execution import job

    register_configs()
    build.register_resolvers()
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tiny_repo.parent.parent))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, "tracking=none", "controlnet=tiny_demo",
                                           f"tracking.store_dir={tmp_path / 'store'}"])
    with monkeypatch.context() as m:
        m.setattr(build, "_CACHE", {})  # this test's pipeline only
        plan = job.prepare(cfg)
        picture = plan.spec.controlnet.image
        m.setattr(plan.spec.controlnet, "mask", picture)
        plan.job_dir = str(tmp_path / "job")
        (tmp_path / "job").mkdir()
        record = job.compute(plan)
    assert record.status == "FAILED" and record.error_kind == "config", record.error
    assert record.error.startswith("ConfigError: config `controlnet`: controlnet_inputs[0]: ControlNet 0 "
                                   "(QwenImageBlockwiseControlNet) takes a control picture")
    assert "Fix:" in record.error and not (tmp_path / "job" / "image.png").exists()
