"""`python -m runner` end to end, in a subprocess, on the embedded tiny model, against real
MLflow stores (SQLite, and a `mlflow server` on 127.0.0.1), asserting through MlflowClient.

The tests share one models folder (built once by the `tiny_repo` fixture, except for the test
of the first run, which builds its own) and one SQLite store, each test in its own experiment
and folder: they pass in any order. Faults (Ctrl-C at a given job) are timed by the runner's
hold points (runner/failpoints.py), never by sleeps or speed.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .processes import rewrite_keeping_size_and_mtime, runner_env, start_mlflow

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model=qwen_image_tiny", "sampler=tiny", "sampler.height=64", "sampler.width=64", "sampler.steps=2",
         "progress_bar=false", "prompt=a red fox in the snow", "device=cpu"]
TERMINAL = {"FINISHED", "FAILED", "KILLED"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner_e2e")
    models = root / "models"
    models.mkdir()
    return {"root": root, "models": models, "store": root / "store", "env": runner_env(models)}


def runner(env, *args: str, name: str, timeout: float = 240, extra_env=None) -> subprocess.CompletedProcess:
    """Run `python -m runner` in the test's folder; Hydra's folders are pinned per call."""
    cwd = env["root"] / name
    cwd.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "runner", *args, f"tracking.store_dir={env['store']}",
            f"hydra.run.dir={cwd}/run", f"hydra.sweep.dir={cwd}/sweep"]
    return subprocess.run(argv, cwd=cwd, env=dict(env["env"], **(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the runner reaches a hold point (runner/failpoints.py) and says so in `path`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the runner ended (exit {proc.returncode}) before {path.name}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
        time.sleep(0.02)


def client(env):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{env['store'] / 'mlflow.db'}")


def runs_of(c, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    return c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)


def split(runs):
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("runner.kind") == "job"]
    return parents, children


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def same_image(a, b) -> bool:
    return np.abs(pixels(a) - pixels(b)).max() <= 2


def assert_done(proc, code=0):
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ----------------------------------------------------------------------------- runs


def test_single_run_builds_the_demo_model_and_logs_one_run(env, tmp_path):
    models = tmp_path / "models"  # its own, empty: this test is the user's very first run
    proc = runner(env, *SMALL, "seed=0", "experiment=single", name="single",
                  extra_env={"DIFFSYNTH_MODEL_BASE_PATH": str(models)})
    assert_done(proc)
    assert (models / "tiny" / "Qwen-Image-Tiny" / "model_index.json").is_file()  # built on first use

    image = env["root"] / "single" / "run" / "image.png"
    from runner.records import read_generation

    gen = read_generation(image)
    assert (gen["seed"], gen["steps"], gen["width"], gen["height"], gen["model"]) == (0, 2, 64, 64, "qwen_image_tiny")
    assert gen["prompt"] == "a red fox in the snow" and gen["loras"] == []

    c = client(env)
    [run] = runs_of(c, "single")
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["sampler.steps"] == "2" and p["sampler.height"] == "64" and p["seed"] == "0"
    assert p["model.name"] == "qwen_image_tiny" and p["runtime.device"] == "cpu" and p["runtime.dtype"] == "float32"
    m = run.data.metrics
    for key in ("load_s", "encode_s", "denoise_s", "s_per_step", "decode_s", "total_s", "peak_mem_mb"):
        assert key in m, key
    assert m["load_s"] > 0 and m["peak_mem_mb"] > 0 and m["s_per_step"] == pytest.approx(m["denoise_s"] / 2)
    t = run.data.tags
    assert t["versions.torch"] and t["device.name"].startswith("cpu") and len(t["checkpoint.sha256"]) == 64
    assert "transformer/diffusion_pytorch_model-00001-of-00002.safetensors" in t["checkpoint.files"]
    if (REPO / ".git").exists():
        assert "git.commit" in t
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"image.png", "config.yaml", "images"} <= arts
    assert any(a.path.startswith("images/image+step+0") for a in c.list_artifacts(run.info.run_id, "images"))
    local = Path(c.download_artifacts(run.info.run_id, "image.png", str(env["root"] / "dl")))
    assert same_image(local, image)
    config_yaml = Path(c.download_artifacts(run.info.run_id, "config.yaml", str(env["root"] / "dl"))).read_text()
    assert "qwen_image_tiny" in config_yaml and "steps: 2" in config_yaml
    # artifacts beside the store, nothing in ./mlruns
    assert run.info.artifact_uri.startswith((env["store"] / "artifacts").as_uri())
    assert not (env["root"] / "single" / "mlruns").exists()
    record = json.loads((image.parent / "job.json").read_text())  # the run's record, beside its image
    assert (record["status"], record["run_id"], record["tracked"]) == ("FINISHED", run.info.run_id, True)
    assert record["metrics"]["total_s"] == pytest.approx(m["total_s"]) and record["config"]["seed"] == 0


def _tiny_lora(models: Path, out: Path, rank: int = 4) -> Path:
    """A diffusers/peft-format LoRA for the tiny transformer, shapes read from its files."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for shard in sorted((models / "tiny" / "Qwen-Image-Tiny" / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if ".attn.to_" in key and key.endswith(".weight") and "norm" not in key:
                    out_f, in_f = f.get_slice(key).get_shape()
                    base = "transformer." + key[: -len(".weight")]
                    tensors[f"{base}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.5
                    tensors[f"{base}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
    assert tensors
    save_file(tensors, str(out))
    return out


@pytest.fixture(scope="module")
def tiny_repo(env) -> Path:
    target = env["models"] / "tiny" / "Qwen-Image-Tiny"
    if not target.exists():
        from pipelines.demo.qwen_image_tiny import build_tiny_repo

        build_tiny_repo(target)
    return target


def library_image(env, repo: Path, seed: int, out: Path) -> Path:
    """The same image from the plain library, in this process (no runner, no LoRA ever loaded)."""
    import torch

    from pipelines.qwen_image import ModelConfig, QwenImagePipeline

    patterns = ["transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
                "vae/diffusion_pytorch_model.safetensors"]
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=sorted(str(p) for p in repo.glob(pattern))) for pattern in patterns],
        tokenizer_config=ModelConfig(path=str(repo / "tokenizer")))
    pipe("a red fox in the snow", seed=seed, num_inference_steps=2, cfg_scale=4.0, height=64, width=64,
         progress_bar=False).save(out)
    return out


def test_sweep_of_seeds_and_lora_alphas_loads_weights_once(env, tiny_repo):
    lora = _tiny_lora(env["models"], env["root"] / "tiny_lora.safetensors")
    # alpha 1 first, so the alpha-0 jobs run on a pipeline that carried the LoRA before
    proc = runner(env, "-m", *SMALL, "lora=file", f"lora.path={lora}", "lora.alpha=1,0", "seed=0,1",
                  "experiment=lora_sweep", name="lora_sweep")
    assert_done(proc)
    log = proc.stdout + proc.stderr
    assert log.count("Loading qwen_image_tiny") == 1, log[-3000:]

    c = client(env)
    parents, children = split(runs_of(c, "lora_sweep"))
    [parent] = parents
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert parent.data.params["lora.alpha"] == "1,0" and parent.data.params["seed"] == "0,1"  # the sweep
    assert parent.data.params["lora"] == "file" and parent.data.params["sampler.steps"] == "2"
    assert all(ch.data.tags["mlflow.parentRunId"] == parent.info.run_id for ch in children)
    assert all(ch.info.status == "FINISHED" for ch in children)
    by = {(ch.data.params["lora.alpha"], ch.data.params["seed"]): ch for ch in children}
    assert set(by) == {("1.0", "0"), ("1.0", "1"), ("0.0", "0"), ("0.0", "1")}
    assert {ch.info.run_name for ch in children} == {f"lora.alpha={a} seed={s}" for a in (1, 0) for s in (0, 1)}
    loads = [ch.data.metrics["load_s"] for ch in sorted(children, key=lambda r: int(r.data.tags["runner.job_num"]))]
    assert loads[0] > 0 and loads[1:] == [0.0, 0.0, 0.0]  # weights loaded once
    assert all("lora.file.sha256" in ch.data.tags for ch in children)

    sweep = env["root"] / "lora_sweep" / "sweep"
    img = {k: sweep / ch.data.tags["runner.job_num"] / "image.png" for k, ch in by.items()}
    assert not same_image(img[("1.0", "0")], img[("0.0", "0")])  # the LoRA acts
    assert not same_image(img[("0.0", "0")], img[("0.0", "1")])  # the seed acts
    # alpha 0 after alpha 1 is the base model exactly: no LoRA lingers
    assert same_image(img[("0.0", "0")], library_image(env, tiny_repo, seed=0, out=env["root"] / "base.png"))

    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"grid.png", "report.html", "jobs.csv", "images"} <= arts
    rows = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert [r["status"] for r in rows] == ["FINISHED"] * 4 and {r["lora.alpha"] for r in rows} == {"1", "0"}
    assert Image.open(sweep / "grid.png").size[0] > 2 * 256  # 2 columns of 256 px cells and their labels


def test_a_failing_job_mid_sweep_is_recorded_and_the_sweep_goes_on(env, tiny_repo):
    """A fault no pre-check can see (the LoRA's header is fine, its data truncated): the job
    fails when it loads the file, is recorded, and the next job runs on a clean pipeline."""
    good = _tiny_lora(env["models"], env["root"] / "fail_good.safetensors")
    data = good.read_bytes()
    bad = env["root"] / "fail_bad.safetensors"
    header = 8 + int.from_bytes(data[:8], "little")
    bad.write_bytes(data[: header + (len(data) - header) // 3])  # header intact, most tensor data gone
    args = ["-m", *SMALL, "lora=file", f"lora.path={good},{bad},{good}", "seed=0", "experiment=fail"]
    proc = runner(env, *args, name="fail")
    assert_done(proc, 1)
    log = proc.stdout + proc.stderr
    assert "1 job(s) failed" in log and "job 1 [" in log and "fail_bad.safetensors" in log

    c = client(env)
    parents, children = split(runs_of(c, "fail"))
    [parent] = parents
    assert parent.info.status == "FAILED"
    children.sort(key=lambda r: int(r.data.tags["runner.job_num"]))
    assert [ch.info.status for ch in children] == ["FINISHED", "FAILED", "FINISHED"]
    assert "fail_bad.safetensors" in children[1].data.tags["runner.error"]
    assert {"grid.png", "report.html", "jobs.csv"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    sweep = env["root"] / "fail" / "sweep"
    rows = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FINISHED"] and "fail_bad" in rows[1]["error"]
    assert not (sweep / "1" / "image.png").exists() and json.loads((sweep / "1" / "job.json").read_text())[
        "status"] == "FAILED"
    assert same_image(sweep / "0" / "image.png", sweep / "2" / "image.png")  # nothing of the bad LoRA lingers


def test_ctrl_c_ends_runs_killed_and_resume_finishes_the_sweep(env, tiny_repo):
    cwd = env["root"] / "interrupt"
    cwd.mkdir()
    holds = cwd / "holds"
    holds.mkdir()
    args = ["-m", *SMALL, "seed=0,1,2,3,4,5", "experiment=interrupt", f"tracking.store_dir={env['store']}"]
    e = dict(env["env"], RUNNER_HOLD="job2", RUNNER_HOLD_DIR=str(holds))
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args, f"hydra.sweep.dir={cwd}/sweep"], cwd=cwd, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(holds / "job2.held", proc)  # jobs 0 and 1 are done, job 2 has started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]

    c = client(env)
    runs = runs_of(c, "interrupt")
    assert all(r.info.status in TERMINAL for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    [parent], children = split(runs)
    assert parent.info.status == "KILLED"
    status = {ch.data.params.get("seed", ch.data.tags["runner.job_num"]): ch.info.status for ch in children}
    assert status == {"0": "FINISHED", "1": "FINISHED", "2": "KILLED"}
    rows = list(csv.DictReader(open(cwd / "sweep" / "jobs.csv")))
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "KILLED"]

    proc = runner(env, *args, "resume=true", name="interrupt_resume")
    assert_done(proc)
    parents, children = split(runs_of(c, "interrupt"))
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    new = [ch for ch in children if ch.data.tags["mlflow.parentRunId"] == parents[1].info.run_id]
    assert {ch.data.params["seed"] for ch in new} == {"2", "3", "4", "5"}
    assert all(ch.info.status == "FINISHED" for ch in new)
    rows = list(csv.DictReader(open(env["root"] / "interrupt_resume" / "sweep" / "jobs.csv")))
    assert [r["status"] for r in rows] == ["SKIPPED", "SKIPPED"] + ["FINISHED"] * 4


def test_resume_takes_an_earlier_run_only_for_the_same_files_and_an_intact_image(env, tiny_repo):
    """One single-image config with `lora.path=lora.safetensors` (relative), resume=true each
    time, one experiment: run from folder A; from folder B, whose lora.safetensors is another
    file (not skipped); from A again after its LoRA was rewritten in place with the same size
    and mtime (run again: the new file, not the first run's image); then from C, holding A's
    new file, after the image artifact of A's second run was deleted from the store (run
    again, saying why), which is a fresh run with that file: the same image as A's second."""
    from pipelines.demo.qwen_image_tiny import build_tiny_lora

    def lora_bytes(seed: int) -> bytes:
        return build_tiny_lora(env["root"] / f"resume_files_lora{seed}.safetensors", seed=seed).read_bytes()

    def run(folder: str, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        cwd = env["root"] / "resume_files" / folder
        proc = subprocess.run([sys.executable, "-m", "runner", *SMALL, "seed=0", "lora=file",
                               "lora.path=lora.safetensors", "experiment=resume_files", "resume=true",
                               f"tracking.store_dir={env['store']}", f"hydra.run.dir={cwd / name}"],
                              cwd=cwd, env=env["env"], capture_output=True, text=True, timeout=240)
        assert_done(proc)
        return proc, cwd / name

    def status(job_dir: Path) -> str:
        return json.loads((job_dir / "job.json").read_text())["status"]

    for folder, seed in (("a", 1), ("b", 2), ("c", 3)):
        (env["root"] / "resume_files" / folder).mkdir(parents=True)
        (env["root"] / "resume_files" / folder / "lora.safetensors").write_bytes(lora_bytes(seed))
    _, first = run("a", "1")
    assert status(first) == "FINISHED"
    _, other = run("b", "2")  # the same relative path names another file there
    assert status(other) == "FINISHED"
    rewrite_keeping_size_and_mtime(env["root"] / "resume_files" / "a" / "lora.safetensors", lora_bytes(3))
    _, rewritten = run("a", "3")
    assert status(rewritten) == "FINISHED"
    assert (rewritten / "image.png").read_bytes() != (first / "image.png").read_bytes()

    c = client(env)
    [earlier] = [r for r in runs_of(c, "resume_files") if r.data.tags["runner.job_dir"] == str(rewritten)]
    artifact = Path(earlier.info.artifact_uri.removeprefix("file://")) / "image.png"
    artifact.unlink()  # the store lost the image of the run that resume would take
    proc, fresh = run("c", "4")
    why = f"rerun: the earlier run's image is missing (run {earlier.info.run_id} has no image.png)"
    assert why in proc.stdout + proc.stderr
    assert status(fresh) == "FINISHED" and json.loads((fresh / "job.json").read_text())["metrics"]["load_s"] > 0
    assert (fresh / "image.png").read_bytes() == (rewritten / "image.png").read_bytes()
    assert len(runs_of(c, "resume_files")) == 4  # every command ran its job: none was skipped


def test_edit_sweep_records_its_input_pictures(env):
    import hashlib

    pictures = []
    for name, color in (("a.png", (200, 40, 40)), ("b.png", (40, 40, 200))):
        path = env["root"] / name
        Image.new("RGB", (64, 48), color).save(path)
        pictures.append(path)
    proc = runner(env, "-m", "model=qwen_image_edit_tiny", "sampler=tiny", "sampler.height=64", "sampler.width=64",
                  "sampler.steps=2", "progress_bar=false", "device=cpu",
                  f"call.edit_image=[{pictures[0]},{pictures[1]}]",
                  "call.edit_image_auto_resize=false", "prompt=make it red,two cats on a sofa in an oil painting",
                  "seed=0,1",
                  "experiment=edit", name="edit", timeout=400)
    assert_done(proc)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in pictures]
    c = client(env)
    [parent], children = split(runs_of(c, "edit"))
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(ch.info.status == "FINISHED" for ch in children)
    for ch in children:
        assert [ch.data.params[f"inputs.edit_image.{i}.sha256"] for i in range(2)] == digests
    inputs = {a.path for a in c.list_artifacts(parent.info.run_id, "inputs")}
    assert inputs == {"inputs/a.png", "inputs/b.png"}  # once for the sweep, not per job
    from runner.records import read_generation

    sweep = env["root"] / "edit" / "sweep"
    gens = [read_generation(sweep / str(i) / "image.png") for i in range(4)]
    assert all([x["sha256"] for x in g["inputs"]["edit_image"]] == digests for g in gens)
    images = {g["prompt"]: pixels(sweep / str(i) / "image.png") for i, g in enumerate(gens) if g["seed"] == 0}
    assert not np.array_equal(images["make it red"], images["two cats on a sofa in an oil painting"])


def test_qwen_image_21_demo_saves_rgba_and_sweeps_its_pictures_and_resolution(env, tmp_path):
    """`model=qwen_image_2_1_tiny sampler=tiny` in a fresh models folder builds the demo model and saves an
    RGBA PNG with its metadata and its MLflow run; a sweep over `call.output_resolution` and `call.edit_image`
    (an RGBA picture) with a grid given by `call.sigmas` runs on one loaded pipeline."""
    from pipelines.demo.qwen_image_21_tiny import TinyQwenImage21Pipeline
    from runner.records import read_generation

    models = {"DIFFSYNTH_MODEL_BASE_PATH": str(tmp_path / "models")}
    proc = runner(env, "model=qwen_image_2_1_tiny", "sampler=tiny", "progress_bar=false", "device=cpu",
                  "experiment=q21", name="q21", extra_env=models)
    assert_done(proc)
    assert (tmp_path / "models" / "tiny" / "Qwen-Image-2.1-Tiny" / "model_index.json").is_file()
    image = env["root"] / "q21" / "run" / "image.png"
    with Image.open(image) as im:
        assert (im.mode, im.size) == ("RGBA", (128, 128))
        alpha = np.asarray(im)[..., 3]
    assert alpha.min() < alpha.max()  # the model's alpha, kept
    gen = read_generation(image)
    assert (gen["model"], gen["steps"], gen["width"], gen["height"]) == ("qwen_image_2_1_tiny", 4, 128, 128)
    c = client(env)
    [run] = runs_of(c, "q21")
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "qwen_image_2_1_tiny"
    logged = Path(c.download_artifacts(run.info.run_id, "image.png", str(tmp_path / "dl")))
    with Image.open(logged) as a, Image.open(image) as b:
        assert a.mode == "RGBA" and np.array_equal(np.asarray(a), np.asarray(b))

    picture = tmp_path / "rgba.png"
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[:, :48] = (200, 40, 40, 255)  # half of it transparent
    Image.fromarray(rgba, "RGBA").save(picture)
    plain = tmp_path / "rgb.png"
    Image.new("RGB", (48, 48), (40, 40, 200)).save(plain)
    proc = runner(env, "-m", "model=qwen_image_2_1_tiny", "sampler=tiny", "sampler.height=null", "sampler.width=null",
                  "progress_bar=false", "device=cpu", "tracking=none", "call.sigmas=[1.0,0.5]",
                  "call.output_resolution=64,96", f"call.edit_image=[{picture}],[{plain},{picture}]",
                  name="q21_sweep", extra_env=models)
    assert_done(proc)
    sweep = env["root"] / "q21_sweep" / "sweep"
    assert (sweep / "grid.png").is_file() and (sweep / "report.html").is_file()
    records = [json.loads((sweep / str(num) / "job.json").read_text()) for num in range(4)]
    assert {(r["config"]["call"]["output_resolution"], len(r["config"]["call"]["edit_image"])) for r in records} == {
        (64, 1), (64, 2), (96, 1), (96, 2)}
    assert all(r["status"] == "FINISHED" for r in records)
    assert records[0]["metrics"]["load_s"] > 0 and all(r["metrics"]["load_s"] == 0.0 for r in records[1:])  # once
    for num, record in enumerate(records):
        assert record["metrics"]["s_per_step"] == pytest.approx(record["metrics"]["denoise_s"] / 2)  # the given grid
        gen = read_generation(sweep / str(num) / "image.png")
        expected = TinyQwenImage21Pipeline.check_arguments({"prompt": "p", **gen["call"]})  # the library's sizes
        assert (gen["width"], gen["height"]) == (expected["width"], expected["height"])
        assert len(gen["inputs"]["edit_image"]) == len(gen["call"]["edit_image"])  # the pictures' sha256
        with Image.open(sweep / str(num) / "image.png") as im:
            assert im.mode == "RGBA"


def test_an_unreadable_qwen_image_21_picture_is_refused_before_anything_loads(env, tmp_path):
    models = tmp_path / "models"
    proc = runner(env, "model=qwen_image_2_1_tiny", "sampler=tiny", "device=cpu",
                  f"call.edit_image=[{REPO / 'pipelines/demo/pictures/a.png'},{REPO / 'README.md'}]",
                  name="q21_refused", extra_env={"DIFFSYNTH_MODEL_BASE_PATH": str(models)})
    assert_done(proc, code=2)
    log = proc.stdout + proc.stderr
    assert "config `call.edit_image[1]`: edit_image[1]" in log and "README.md" in log
    assert not models.exists() and not (env["root"] / "q21_refused" / "run").exists()  # nothing built or written


def test_vram_presets_run_on_the_library(env, tiny_repo):
    proc = runner(env, "-m", *SMALL, "tracking=none", "vram=none,cpu_offload,disk", name="vram")
    assert_done(proc)
    log = proc.stdout + proc.stderr
    assert log.count("Loading qwen_image_tiny") == 3  # a preset is part of the pipeline's identity
    sweep = env["root"] / "vram" / "sweep"
    assert [r["status"] for r in csv.DictReader(open(sweep / "jobs.csv"))] == ["FINISHED"] * 3
    assert same_image(sweep / "0" / "image.png", sweep / "1" / "image.png")  # offload changes no pixel
    # disk keeps its weights in float8 once read: exactly the plain pipeline on weights rounded
    # through float8 (matrices; vectors kept), the oracle of tests/test_vram.py
    import torch

    from pipelines import ModelConfig, QwenImagePipeline

    from .test_vram import write_rounded_repo

    rounded = write_rounded_repo(env["models"] / "tiny" / "Qwen-Image-Tiny", env["root"] / "vram_fp8", "float8")
    oracle = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=rounded / f) for f in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=rounded / "tokenizer"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner's subprocess (OMP_NUM_THREADS=1)
    try:
        expected = oracle("a red fox in the snow", seed=0, height=64, width=64, num_inference_steps=2, tiled=True,
                          progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    disk = np.asarray(Image.open(sweep / "2" / "image.png"), dtype=np.int16)
    assert np.array_equal(disk, np.asarray(expected, dtype=np.int16))
    plain = np.asarray(Image.open(sweep / "0" / "image.png"), dtype=np.int16)
    assert np.abs(plain - disk).mean() > 1  # float8 storage shows: the comparison above is not empty


# ------------------------------------------------------------------------ server


@pytest.fixture
def mlflow_server(env, tmp_path):
    proc, url = start_mlflow("server", ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                        "--artifacts-destination", str(tmp_path / "art")], tmp_path, env["env"])
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_against_a_tracking_server(env, tiny_repo, mlflow_server):
    from mlflow import MlflowClient

    proc = runner(env, *SMALL, "seed=0", f"tracking.uri={mlflow_server}", "experiment=server", name="server")
    assert_done(proc)
    c = MlflowClient(mlflow_server)
    [run] = runs_of(c, "server")
    assert run.info.status == "FINISHED"
    assert run.data.params["sampler.steps"] == "2" and run.data.metrics["total_s"] > 0
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {"image.png", "config.yaml", "images"} <= {a.path for a in c.list_artifacts(run.info.run_id)}


# ------------------------------------------------------------------------ download command


def test_download_command(env, tmp_path):
    # a closed loopback port stands for an unreachable hub: nothing leaves this machine
    e = dict(env["env"], DIFFSYNTH_MODEL_BASE_PATH=str(tmp_path / "models"), MODELSCOPE_ENDPOINT="http://127.0.0.1:9")

    def download(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "runner", "download", *overrides], cwd=tmp_path, env=e,
                              capture_output=True, text=True, timeout=240)

    built = download("model=qwen_image_tiny")
    assert_done(built)
    assert "already present" in built.stderr
    assert (tmp_path / "models" / "tiny" / "Qwen-Image-Tiny" / "transformer").is_dir()

    unreachable = download("model=qwen_image", "lora=artaug")
    assert_done(unreachable, code=1)
    assert "model_id='Qwen/Qwen-Image'" in unreachable.stderr and "127.0.0.1:9" in unreachable.stderr

    bad = download("model=qwen_image", "sampler.height=0")
    assert_done(bad, code=2)
    assert "config `sampler.height`" in bad.stderr


def test_sweeping_the_experiment_is_refused_before_any_job(env):
    proc = runner(env, "-m", *SMALL, "experiment=a,b", name="swept_experiment")
    assert_done(proc, code=2)
    assert "config `experiment`: cannot be swept" in proc.stdout + proc.stderr
    assert not (env["root"] / "swept_experiment" / "sweep" / "0").exists()
