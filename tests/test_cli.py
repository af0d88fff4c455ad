"""The command line: `--help`, a misspelt key, a sweep's progress and its grid/report, the
demo LoRA preset end to end, `report --run` from MLflow, resume with nothing to do (real
subprocesses, a real SQLite MLflow store, the tiny model)."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .processes import runner_env

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model=qwen_image_tiny", "sampler=tiny", "sampler.steps=1", "sampler.height=32", "sampler.width=32",
         "progress_bar=false"]


def _runner(tmp: Path, *args: str, models: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=tmp, env=runner_env(models or tmp / "models"),
                          capture_output=True, text=True, timeout=300)


def test_help_says_what_the_runner_does_without_loading_hydra_torch_or_mlflow(tmp_path):
    code = ("import runpy, sys; sys.argv = ['runner', '--help']\n"
            "try:\n    runpy.run_module('runner', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "print('LOADED', sorted(m for m in ('torch', 'mlflow', 'hydra', 'omegaconf') if m in sys.modules), code)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=runner_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert out.rstrip().endswith("LOADED [] 0")  # nothing heavy imported, exit status 0
    assert "generate images" in out and "python -m runner -m" in out
    for group in ("model", "vram", "sampler", "lora", "tracking", "controlnet"):  # every option, from conf/
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        listed = re.split(r"\n  (?=\S)", out.split(f"  {group}:", 1)[1])[0]
        assert all(o in listed for o in options), (group, options, listed)
    for command in ("download", "report", "sync", "cleanup", "warm"):
        assert f"\n  {command} " in out
    assert "seed=null draws a random seed" in out and "--hydra-help" in out
    assert "mlflow ui --backend-store-uri sqlite:///outputs/mlflow/mlflow.db" in out
    assert "lora=tiny_demo lora.alpha=0,0.5,1 seed=0,1" in out  # the sweep the README shows
    assert "controlnet=tiny_demo" in out  # the ControlNet demo the README shows


def test_a_misspelt_key_without_plus_gets_did_you_mean_and_creates_nothing(tmp_path):
    proc = _runner(tmp_path, "model=qwen_image_tiny", "sampler=tiny", "sampler.stepz=3")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()  # one line: what, where, the fix
    assert line.startswith("config `sampler.stepz`: ") and line.endswith("Fix: did you mean `sampler.steps`?")
    assert not (tmp_path / "outputs").exists()  # no folder, no MLflow store, no run


def test_a_report_axis_that_is_not_swept_refuses_the_sweep(tmp_path):
    proc = _runner(tmp_path, "-m", *SMALL, "seed=0,1", "report.x=sed")
    assert proc.returncode == 2, proc.stderr
    log = proc.stdout + proc.stderr
    assert "config `report.x`: 'sed' is not swept by this sweep" in log and "did you mean `seed`?" in log
    assert not (tmp_path / "outputs" / "mlflow").exists()  # no store, no run
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]  # no sweep folder


@pytest.mark.parametrize("group", ["hydra/launcher", "hydra/sweeper"])
def test_a_sweeper_or_launcher_not_of_the_runner_is_refused_before_anything(tmp_path, group):
    """Hydra's own basic launcher would run each job in a fresh composition (no weights kept),
    its basic sweeper would recompose every job: the runner's plugins say so, exit 2."""
    proc = _runner(tmp_path, "-m", *SMALL, "seed=0,1", f"{group}=basic")
    assert proc.returncode == 2, proc.stderr
    [line] = [line for line in (proc.stdout + proc.stderr).splitlines() if "Fix:" in line]
    assert f"config `{group}`: " in line and "is not supported" in line and f"leave {group} at its default" in line
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.yaml"))  # nothing written


@pytest.fixture()
def models(tmp_path, tiny_repo) -> Path:
    """A models folder holding the tiny model (the fixture's) but no demo LoRA yet."""
    folder = tmp_path / "models"
    (folder / "tiny").mkdir(parents=True)
    (folder / "tiny" / "Qwen-Image-Tiny").symlink_to(tiny_repo)
    return folder


def test_demo_lora_sweep_writes_grid_and_report_and_logs_them_on_the_parent(tmp_path, models):
    """The README's sweep with the demo LoRA, built on first use; then `report --run` from MLflow,
    and the same sweep with resume=true: nothing to do, no new run."""
    from mlflow import MlflowClient
    from PIL import Image

    store = tmp_path / "store"
    args = ["-m", *SMALL, "lora=tiny_demo", "lora.alpha=0,1", "seed=0,1", f"tracking.store_dir={store}",
            "report.x=seed", 'prompt="a cat seed=5"']  # a value holding ` key=value`, after the swept seed
    proc = _runner(tmp_path, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", models=models)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert (models / "tiny" / "Qwen-Image-Tiny-LoRA" / "tiny_demo.safetensors").is_file()
    assert "job 0 (1/4): lora.alpha=0 seed=0" in log and "job 3 (4/4, ETA " in log
    sweep = tmp_path / "sweep"
    assert {"grid.png", "report.html", "jobs.csv"} <= {p.name for p in sweep.iterdir()}
    assert not (sweep / "contact_sheet.png").exists()
    assert "columns: <code>seed</code>; rows: <code>lora.alpha</code>" in (sweep / "report.html").read_text()
    images = {r["job"]: Image.open(sweep / r["job"] / "image.png").tobytes() for r in csv.DictReader(
        open(sweep / "jobs.csv"))}
    assert images["0"] != images["2"]  # alpha 0 vs 1, same seed: the LoRA acts

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qwen-image")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "sweep sweep lora.alpha=0,1 seed=0,1" and len(children) == 4
    assert {c.info.run_name for c in children} == {f"lora.alpha={a} seed={s}" for a in (0, 1) for s in (0, 1)}
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"grid.png", "report.html", "jobs.csv", "images"} <= arts
    assert any(a.path.startswith("images/grid+step+0") for a in client.list_artifacts(parent.info.run_id, "images"))
    assert all(any(a.path.startswith("images/image+step+0") for a in client.list_artifacts(c.info.run_id, "images"))
               for c in children)
    assert f"mlflow ui --backend-store-uri sqlite:///{store.resolve() / 'mlflow.db'}" in log
    assert "click Model training (top left), Experiments, the experiment" in log

    from runner.commands import jobs_from_mlflow

    jobs = jobs_from_mlflow(f"sqlite:///{store / 'mlflow.db'}", parent.info.run_id, tmp_path / "dl")
    assert sorted(j.values["seed"] for j in jobs) == ["0", "0", "1", "1"]  # not 5: the prompt is not split
    assert 'prompt="a cat seed=5"' in jobs.overrides

    out = tmp_path / "from_mlflow"
    rebuilt = _runner(tmp_path, "report", "--run", parent.info.run_id, "--tracking-uri",
                      f"sqlite:///{store / 'mlflow.db'}", "--out", str(out), "x=lora.alpha", models=models)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "Downloading artifacts" not in rebuilt.stdout + rebuilt.stderr  # no progress bar per image fetched
    page = out / "report_x=lora.alpha_y=seed.html"
    assert (out / "grid_x=lora.alpha_y=seed.png").is_file() and "columns: <code>lora.alpha</code>" in page.read_text()
    # the parent run gets the rebuilt files beside its own, which are left as they were
    arts = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id)}
    assert {"grid_x=lora.alpha_y=seed.png", "report_x=lora.alpha_y=seed.html"} <= set(arts)
    assert arts["grid.png"] == (sweep / "grid.png").stat().st_size
    assert arts["report.html"] == (sweep / "report.html").stat().st_size

    again = _runner(tmp_path, *args, "resume=true", f"hydra.sweep.dir={tmp_path / 'again'}", models=models)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every job already has a FINISHED run" in again.stdout + again.stderr
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)  # no empty parent run
    assert (tmp_path / "again" / "grid.png").is_file()  # the skipped jobs' images, from their runs


def test_a_prompt_arrives_as_typed(tmp_path, models):
    """`${...}` in a prompt is text: the PNG, job.json, the MLflow run's param and config.yaml
    hold it as typed; the prompt is not resolved (no environment variable leaks into it)."""
    import json

    from mlflow import MlflowClient
    from PIL import Image

    prompt = "a fox named ${oc.env:HOME} in ${nope}"
    store, run_dir = tmp_path / "store", tmp_path / "run"
    proc = _runner(tmp_path, *SMALL, f"prompt={prompt}", f"tracking.store_dir={store}", f"hydra.run.dir={run_dir}",
                   models=models)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(run_dir / "image.png") as im:
        assert json.loads(im.text["generation"])["prompt"] == prompt
        assert im.text["parameters"].startswith(prompt + "\n")
    assert json.loads((run_dir / "job.json").read_text())["config"]["prompt"] == prompt
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("qwen-image").experiment_id])
    assert run.data.params["prompt"] == prompt and f"prompt={prompt}" in run.info.run_name
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert f"prompt: {prompt}" in config_yaml.read_text()
