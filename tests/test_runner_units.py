"""Runner parts without a model: the pipeline cache and LoRA switching (on a stand-in
pipeline), PNG metadata, contact sheet and job table, provenance, and the MLflow tracker
against a real SQLite store."""
from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from pipelines import Pipeline
from runner.build import arguments, loras
from runner.build import pipeline as build
from runner.config import CONF_DIR
from runner.config.checks import to_spec
from runner.config.schema import register_configs
from runner.records import FAILED, FINISHED, KILLED, JobRecord, flatten, read_generation, save_png, write_table
from runner.tracking.provenance import FingerprintCache, git_commit, package_versions
from runner.tracking.store import Tracker, default_artifact_location, store_uri

register_configs()
build.register_resolvers()


class FakeHandle:
    def __init__(self, calls):
        self.calls = calls

    def set_alpha(self, alpha):
        self.calls.append(("set_alpha", alpha))


class FakePipeline(Pipeline):
    """Records what the runner asks of a pipeline."""

    loads = 0
    with_handles = False
    lora_target = "dit"
    supports_vram_management = False

    def __init__(self):
        self.calls: list[tuple] = []
        self.dit = object()
        self.timings = {}

    def __call__(self, prompt, negative_prompt="", seed=None, progress_bar=True, num_inference_steps=1, cfg_scale=1.0,
                 height=64, width=64, scheduler=None):
        raise AssertionError("not called in these tests")

    @classmethod
    def from_pretrained(cls, **kwargs):
        cls.loads += 1
        pipe = cls()
        pipe.kwargs = kwargs
        return pipe

    def load_lora(self, module, lora, alpha=1.0):
        assert module is self.dit
        self.calls.append(("load", type(lora).__name__, alpha))
        return FakeHandle(self.calls) if self.with_handles else None

    def clear_lora(self):
        self.calls.append(("clear",))


@pytest.fixture()
def lora_file(tmp_path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "l.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 4)}, str(path))
    return path


def spec_for(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=qwen_image_tiny", "model.build=null", f"model.pipeline={__name__}.FakePipeline", *overrides])
    return to_spec(cfg)


@pytest.mark.parametrize("with_handles", [False, True])
def test_weights_load_once_and_lora_changes_never_reload_nor_linger(lora_file, with_handles, monkeypatch):
    build.release()
    FakePipeline.loads = 0
    monkeypatch.setattr(FakePipeline, "with_handles", with_handles)
    rt = build.Runtime("cpu", "float32")
    lora = [f"lora.path={lora_file}", "lora=file"]
    # without handles every change is clear + load; with handles an alpha change is set_alpha
    change = (lambda a: [("set_alpha", a)]) if with_handles else (lambda a: [("clear",), ("load", "str", a)])
    sequence = [
        ([], []),
        ([*lora, "lora.alpha=1"], [("load", "str", 1.0)]),
        ([*lora, "lora.alpha=1", "seed=3", "sampler.steps=2"], []),  # same LoRA: nothing
        ([*lora, "lora.alpha=0.5"], change(0.5)),
        ([*lora, "lora.alpha=0"], change(0.0)),
        ([], [("clear",)]),
        ([*lora, "lora.alpha=2"], [("load", "str", 2.0)]),
        (["sampler.height=64"], [("clear",)]),
    ]
    pipe = None
    for i, (overrides, expected) in enumerate(sequence):
        spec = spec_for(*overrides)
        entry, load_s = build.get_pipeline(spec, rt)
        pipe = pipe or entry.pipe
        assert entry.pipe is pipe and (load_s > 0) == (i == 0)
        before = len(pipe.calls)
        loras.apply_loras(entry, spec)
        assert pipe.calls[before:] == expected, overrides
    assert FakePipeline.loads == 1

    # after a failed job the applied LoRAs are unknown: the next job clears first
    loras.forget_lora_state(entry)
    before = len(pipe.calls)
    loras.apply_loras(entry, spec_for())
    assert pipe.calls[before:] == [("clear",)]

    # another dtype is another pipeline: the old one is dropped, the new one loaded
    entry2, load_s = build.get_pipeline(spec_for(), build.Runtime("cpu", "bfloat16"))
    assert entry2.pipe is not pipe and FakePipeline.loads == 2 and load_s > 0
    build.release()


def test_pipeline_gets_model_configs_and_runtime():
    build.release()
    spec = spec_for()
    entry, _ = build.get_pipeline(spec, build.Runtime("cpu", "float32"))
    import torch

    kw = entry.pipe.kwargs
    assert kw["torch_dtype"] is torch.float32 and kw["device"] == "cpu" and kw["vram_limit"] is None
    assert [c.origin_file_pattern for c in kw["model_configs"]][0] == "transformer/diffusion_pytorch_model*.safetensors"
    assert all(c.model_id == "tiny/Qwen-Image-Tiny" and c.skip_download for c in kw["model_configs"])
    assert not any(c.vram_managed for c in kw["model_configs"])
    assert kw["tokenizer_config"].origin_file_pattern == "tokenizer/"
    build.release()


def test_vram_presets_map_auto_to_the_runtime():
    import torch

    spec = spec_for("vram=fp8")
    configs, tokenizer, processor = build.model_configs(spec, build.Runtime("cuda", "bfloat16"))
    assert processor is None
    c = configs[0]
    assert c.offload_dtype is torch.float8_e4m3fn and c.offload_device == "cpu"
    assert c.onload_device == "cuda" and c.preparing_dtype is torch.float8_e4m3fn
    assert c.computation_dtype is None and c.computation_device is None  # the pipeline's own
    assert not tokenizer.vram_managed
    c = build.model_configs(spec_for("vram=disk"), build.Runtime("cuda", "bfloat16"))[0][0]
    assert (c.offload_dtype, c.offload_device, c.onload_device) == ("disk", "disk", "cpu")


@pytest.mark.parametrize("preset", ["cpu_offload", "fp8", "low_vram", "disk"])
def test_vram_presets_are_refused_at_once_by_a_pipeline_without_vram_management(preset):
    from runner.errors import ConfigError

    assert not FakePipeline.supports_vram_management
    with pytest.raises(ConfigError, match="vram=none") as err:
        arguments.preflight(spec_for(f"vram={preset}"))
    assert err.value.key == "vram" and preset in str(err.value)
    arguments.preflight(spec_for("vram=none"))


_BUILDER = """
import os
import time
from pathlib import Path


def build(out):
    out, folder = Path(out), Path(os.environ["LOCKTEST_DIR"])
    with open(folder / "calls", "a") as f:
        f.write(f"{os.getpid()}\\n")
    (folder / "building").write_text(str(os.getpid()))
    deadline = time.monotonic() + 180
    while not _second_waits_on_a_lock(folder):  # hold the lock until the other process waits for it
        if time.monotonic() > deadline:
            raise TimeoutError("the second process never waited on the build lock")
        time.sleep(0.01)
    staging = out.with_name(out.name + ".staging")
    staging.mkdir(parents=True)
    (staging / "model_index.json").write_text("{}")
    staging.rename(out)
    return out


def _second_waits_on_a_lock(folder):
    pid_file = folder / "second.pid"
    if not pid_file.exists():
        return False
    pid = pid_file.read_text().strip()
    with open("/proc/locks") as f:  # a blocked waiter is listed as `N: -> FLOCK ADVISORY WRITE <pid> ...`
        return any(t[1:2] == ["->"] and t[5:6] == [pid] for t in (line.split() for line in f))
"""

_ENSURE_BUILT = """
from runner.build import pipeline as build
from runner.config.checks import to_spec
from runner.config.compose import compose

build.ensure_built(to_spec(compose(["model=qwen_image_tiny", "model.build=locktest_builder.build"])))
"""


def test_ensure_built_builds_once_under_a_lock(tmp_path):
    """Two processes want the same missing model: one builds it while the other waits on the
    lock (seen waiting in /proc/locks), then finds it built."""
    import os
    import subprocess
    import sys
    import time

    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see the second process wait")
    (tmp_path / "locktest_builder.py").write_text(_BUILDER)
    env = dict(os.environ, LOCKTEST_DIR=str(tmp_path), DIFFSYNTH_MODEL_BASE_PATH=str(tmp_path / "models"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parent.parent)]))
    cmd = [sys.executable, "-c", _ENSURE_BUILT]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "building").exists():  # the first one holds the lock and builds
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.02)
        second = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (tmp_path / "second.pid").write_text(str(second.pid))
        out2, _ = second.communicate(timeout=240)
        out1, _ = first.communicate(timeout=240)
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0 and second.returncode == 0, out1[-3000:] + out2[-3000:]
    assert (tmp_path / "calls").read_text().split() == [str(first.pid)]  # built once, by the first
    assert (tmp_path / "models" / "tiny" / "Qwen-Image-Tiny" / "model_index.json").is_file()


# ------------------------------------------------------------------------ report


def test_png_keeps_its_generation_parameters(tmp_path):
    gen = {"prompt": "a cat", "negative_prompt": "", "seed": 3, "steps": 4, "cfg_scale": 4.0, "width": 64,
           "height": 32, "sampler": "tiny", "model": "qwen_image_tiny", "loras": [["artaug", 0.5]]}
    path = save_png(Image.new("RGB", (64, 32), "red"), tmp_path / "job" / "image.png", gen)
    assert read_generation(path) == gen
    with Image.open(path) as im:
        text = im.text["parameters"]
    assert text.startswith("a cat\n") and "Seed: 3" in text and "Size: 64x32" in text and "artaug:0.5" in text
    assert [p.name for p in path.parent.iterdir()] == ["image.png"]  # no temp file left


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def read_a1111(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of a `parameters` text, read as AUTOMATIC1111's web UI
    reads it (modules/infotext_utils.py, parse_generation_parameters)."""
    prompt, negative, done = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    return prompt, negative, {k: v.strip() for k, v in _PARAM.findall(last)}


def test_png_parameters_text_reads_back_whatever_the_prompt_holds(tmp_path):
    """A1111's `parameters` format has no escaping: a prompt's line breaks become spaces there, so
    a line `Negative prompt: ...` or `Steps: ...` inside it stays part of the prompt; the
    `generation` chunk keeps the exact text."""
    prompt = "a cat\nNegative prompt: a dog\nSteps: 99, CFG scale: 1, Seed: 5, Size: 1x1"
    gen = {"prompt": prompt, "negative_prompt": "blurry\r\nugly", "seed": 3, "steps": 4, "cfg_scale": 4.0,
           "width": 64, "height": 32, "sampler": "tiny", "model": "qwen_image_tiny", "loras": [["a\nb", 0.5]]}
    path = save_png(Image.new("RGB", (64, 32)), tmp_path / "image.png", gen)
    with Image.open(path) as im:
        text = im.text["parameters"]
    read_prompt, read_negative, settings = read_a1111(text)
    assert read_prompt == "a cat Negative prompt: a dog Steps: 99, CFG scale: 1, Seed: 5, Size: 1x1"
    assert read_negative == "blurry ugly"
    assert (settings["Steps"], settings["Seed"], settings["Size"], settings["LoRAs"]) == ("4", "3", "64x32", "a b:0.5")
    assert read_generation(path)["prompt"] == prompt


def test_a_job_run_gets_the_params_a_user_compares_by_and_every_overridden_key():
    """~20 params instead of the whole flattened config (~60, ~120 for a real model): the run's
    card and MLflow's Compare page stay readable; the config is the run's config.yaml."""
    from runner.execution import job
    from runner.tracking.runs import logged_params

    overrides = ["model=qwen_image_tiny", "lora=file", f"lora.path={__file__}", "lora.alpha=0.5", "seed=3",
                 "vram=disk", "vram.vram_limit=2", "call.tiled=true", "+lora.stack.extra.path=" + __file__,
                 "+lora.stack.extra.alpha=0.25"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        plan = job.prepare(compose("config", overrides=overrides), 0, overrides)
    record = job.new_record(plan)
    params = logged_params(record)
    assert {"model.name", "prompt", "negative_prompt", "seed", "sampler.steps", "sampler.cfg_scale",
            "sampler.height", "sampler.width", "lora.name", "lora.alpha", "lora.path", "lora.stack.extra.alpha",
            "lora.stack.extra.path", "vram.name", "vram.vram_limit", "dtype", "device", "runtime.device",
            "runtime.dtype", "call.tiled"} <= set(params)
    assert not [k for k in params if k.startswith(("model.files", "tracking.", "report.", "vram.offload"))]
    assert all(params[k] == record.params[k] for k in params)
    assert len(params) <= 25 < len(record.params)


def _records(tmp_path: Path) -> list[JobRecord]:
    out = []
    for i, (seed, alpha) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        r = JobRecord(i, ["model=tiny", f"seed={seed}", f"lora.alpha={alpha}"], status=FINISHED,
                      run_id=f"r{i}", metrics={"total_s": 1.0 + i, "load_s": 0.5 if i == 0 else 0.0})
        if i != 2:
            r.image_path = tmp_path / f"{i}.png"
            Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(r.image_path)
        else:
            r.status, r.error = FAILED, "RuntimeError: boom"
        out.append(r)
    return out


def test_job_table(tmp_path):
    path = write_table(_records(tmp_path), tmp_path / "jobs.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert rows[1]["seed"] == "0" and rows[1]["lora.alpha"] == "1" and rows[2]["error"] == "RuntimeError: boom"
    assert float(rows[0]["load_s"]) == 0.5 and rows[3]["total_s"] == "4"


# ---------------------------------------------------------------------- provenance


def test_git_commit_is_read_without_git(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    assert git_commit.__wrapped__(tmp_path) is None  # no commit yet
    (git / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert git_commit.__wrapped__(tmp_path) == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert git_commit.__wrapped__(tmp_path) == "b" * 40
    assert "torch" in package_versions() and "mlflow" in package_versions()


def test_fingerprints_are_hashed_once_and_cached_on_disk(tmp_path):
    (tmp_path / "m" / "tok").mkdir(parents=True)
    (tmp_path / "m" / "w.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "m" / "tok" / "vocab.json").write_text("{}")
    cache_file = tmp_path / "store" / "fingerprints.json"
    first = FingerprintCache(cache_file)
    d1 = first.describe([tmp_path / "m" / "w.safetensors", tmp_path / "m" / "tok"])
    assert [f["name"] for f in d1["files"]] == ["m/w.safetensors", "tok/vocab.json"] and d1["bytes"] == 1002
    assert len(first.hashed) == 2
    second = FingerprintCache(cache_file)  # another process: from the disk cache
    assert second.describe([tmp_path / "m" / "w.safetensors", tmp_path / "m" / "tok"]) == d1
    assert second.hashed == []
    (tmp_path / "m" / "w.safetensors").write_bytes(b"y" * 1000)  # changed file: hashed again
    d3 = second.describe([tmp_path / "m" / "w.safetensors"])
    assert second.hashed == [tmp_path / "m" / "w.safetensors"] and d3["sha256"] != d1["sha256"]


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_hashed_again(tmp_path):
    """What `cp -p`, `rsync -t` or `touch -r` leave: new content in the same file (same inode),
    the same size and modification time. Neither the memory nor the disk cache answers the old hash."""
    import hashlib

    path, cache_file = tmp_path / "lora.safetensors", tmp_path / "store" / "fingerprints.json"
    path.write_bytes(b"x" * 1000)
    before = path.stat()
    cache = FingerprintCache(cache_file)
    assert cache.sha256(path) == hashlib.sha256(b"x" * 1000).hexdigest()
    with open(path, "r+b") as f:  # in place: the inode stays
        f.write(b"y" * 1000)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    new = hashlib.sha256(b"y" * 1000).hexdigest()
    assert cache.sha256(path) == new  # this process's memory
    assert FingerprintCache(cache_file).sha256(path) == new  # another process: the file on disk


def test_a_jobs_identity_knows_its_models_folder_and_resume_its_checkpoint_files(tmp_path, monkeypatch):
    """The checkpoint is not hashed into a job's config hash (tens of GB): the hash holds the
    models folder it loads from (another folder: another job), and resume compares the earlier
    run's checkpoint fingerprint with the files there now, a rewrite that keeps size and mtime
    (`cp -p`) included."""
    from pipelines.demo.qwen_image_tiny import build_tiny_repo
    from runner.execution import job
    from runner.tracking.provenance import fingerprint_tags

    from .processes import rewrite_keeping_size_and_mtime

    def plan_in(models: Path):
        monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(models))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["model=qwen_image_tiny", "device=cpu",
                                               f"tracking.store_dir={tmp_path / 'store'}"])
        return job.prepare(cfg)

    repo = build_tiny_repo(tmp_path / "models" / "tiny" / "Qwen-Image-Tiny")
    elsewhere = plan_in(tmp_path / "elsewhere")
    plan = plan_in(tmp_path / "models")
    assert plan.config_hash != elsewhere.config_hash
    files = build.spec_checkpoint_files(plan.spec, plan.runtime)
    tags = fingerprint_tags("checkpoint", job.fingerprint_cache(plan.spec).describe(files))
    assert job.changed_since(plan, tags) is None
    assert job.changed_since(plan, {}) == "the earlier run recorded no sha256 of the checkpoint"

    other = build_tiny_repo(tmp_path / "other", seed=1)
    shard = sorted((repo / "transformer").glob("*.safetensors"))[0]
    rewrite_keeping_size_and_mtime(shard, (other / "transformer" / shard.name).read_bytes())
    assert job.changed_since(plan, tags).startswith("the files of the checkpoint changed since the earlier run")


# ------------------------------------------------------------------------ tracking


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [2, {"d": 3}]}, "e": {}, "f": []}) == {
        "a.b": 1, "a.c.0": 2, "a.c.1.d": 3, "e": "{}", "f": "[]"}


def test_tracker_on_sqlite_sets_artifacts_beside_the_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = spec_for(f"tracking.store_dir={tmp_path / 'store'}").tracking
    assert store_uri(spec) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    tracker = Tracker(spec, "exp/one")
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.artifact_location == (tmp_path / "store" / "artifacts" / "exp_one").as_uri()
    assert Tracker(spec, "exp/one").experiment_id == tracker.experiment_id  # reused

    parent = tracker.start_run("sweep", {"runner.kind": "sweep"})
    child = tracker.start_run("job", {"runner.config_hash": "h1"}, parent_id=parent)
    tracker.log_params(child, {f"p{i}": i for i in range(150)} | {"none": None, "long": "x" * 9000})
    tracker.log_metrics(child, {"total_s": 1.5})
    tracker.end_run(child, FINISHED)
    assert tracker.find_finished("h1").info.run_id == child
    assert tracker.find_finished("h2") is None
    failed = tracker.start_run("job", {"runner.config_hash": "h2"}, parent_id=parent)
    tracker.end_run(failed, FAILED)
    assert tracker.find_finished("h2") is None  # only FINISHED runs count for resume
    open_one = tracker.start_run("job", {}, parent_id=parent)
    tracker.end_all(KILLED)  # the exit path
    runs = {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert {rid: r.info.status for rid, r in runs.items()} == {
        parent: KILLED, child: FINISHED, failed: FAILED, open_one: KILLED}
    assert runs[child].data.tags["mlflow.parentRunId"] == parent
    assert len(runs[child].data.params) == 152 and runs[child].data.params["none"] == "null"
    assert len(runs[child].data.params["long"]) == 6000  # MLflow's limit, with a note saying so
    assert runs[child].data.params["long"].endswith("(cut: 9000 characters, MLflow keeps 6000; the whole text is "
                                                    "in the job's config.yaml and its image.png)")
    assert not (tmp_path / "mlruns").exists()


def test_artifact_location_for_a_server_is_left_to_the_server():
    spec = spec_for("tracking.uri=http://127.0.0.1:5000").tracking
    assert default_artifact_location(spec, "x") is None


def test_png_generation_chunk_json_roundtrip(tmp_path):
    # the PNG text chunk is JSON: non-ASCII prompts survive
    gen = {"prompt": "猫 — café", "negative_prompt": " ", "seed": 0, "steps": 1, "cfg_scale": 1.0,
           "width": 16, "height": 16, "sampler": "lightning", "model": "m", "loras": []}
    path = save_png(Image.new("RGB", (16, 16)), tmp_path / "i.png", gen)
    assert read_generation(path)["prompt"] == "猫 — café"
    assert json.loads(Image.open(path).text["generation"])["sampler"] == "lightning"


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    from runner.files import atomic_write

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "jobs.csv", broken)
    assert list(tmp_path.iterdir()) == []
    atomic_write(tmp_path / "jobs.csv", lambda tmp: tmp.write_text("ok"))
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.csv"] and (tmp_path / "jobs.csv").read_text() == "ok"


# ------------------------------------------------------------- records and folders


def test_job_record_round_trips_through_json_and_pickle(tmp_path):
    import pickle

    from runner.records import JobRecord, SweepRecord

    r = JobRecord(3, ["seed=1"], status=FINISHED, metrics={"total_s": 1.5}, image_path=tmp_path / "i.png",
                  job_dir=str(tmp_path), params={"seed": 1, "dtype": None}, tags={"a": "b"},
                  config={"sampler": {"steps": 2}}, inputs=[{"arg": "x", "index": 0, "path": "p", "sha256": "h"}],
                  tracked=False)
    path = r.write(tmp_path / "job.json")
    back = JobRecord.read(path)
    assert back == pickle.loads(pickle.dumps(back))
    assert back.to_json() == r.to_json() and back.image_path == str(tmp_path / "i.png")
    assert json.loads(path.read_text())["format"] == "runner.job/1"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # written through a temporary file
    with pytest.raises(ValueError, match="not a runner.sweep/1 record"):
        SweepRecord.read(path)


def test_an_image_is_never_overwritten(tmp_path):
    from runner.files import exclusive_write

    target = tmp_path / "job" / "image.png"
    exclusive_write(target, lambda tmp: tmp.write_text("first"))
    with pytest.raises(FileExistsError, match="never overwritten"):
        exclusive_write(target, lambda tmp: tmp.write_text("second"))
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["image.png"]


def test_claimed_folders_are_never_shared(tmp_path, monkeypatch):
    from runner import files

    monkeypatch.setattr(files, "_CLAIMED", {})
    base = str(tmp_path / "multirun" / "2025-01-02" / "03-04-05")
    first = files.claim_dir(base)
    assert first == base and Path(first).is_dir()
    assert files.claim_dir(base) == first  # the same sweep asks again: its own folder
    monkeypatch.setattr(files, "_CLAIMED", {})  # another process started in the same second
    assert files.claim_dir(base) == base + "-2"
    monkeypatch.setattr(files, "_CLAIMED", {})
    assert files.claim_dir(base) == base + "-3"
    files.release_claim(Path(base + "-3"))  # a refused sweep leaves no folder
    assert not Path(base + "-3").exists() and Path(base + "-2").exists()


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from runner.files import remove_stale_temp_files, temp_path
    from runner.records import JobRecord

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    JobRecord(0, []).write(tmp_path / "0" / "job.json")  # a job folder of the runner's
    dead = temp_path(tmp_path / "0" / "image.png", dead_pid)
    alive = temp_path(tmp_path / "0" / "job.json")
    keep = tmp_path / "0" / "image.png"
    for p in (dead, alive, keep):
        p.write_text("x")
    assert remove_stale_temp_files([tmp_path]) == [dead]
    assert not dead.exists() and alive.exists() and keep.exists()


def test_owner_tags_tell_a_live_owner_from_a_dead_one():
    import subprocess
    import sys

    from runner.owner import ALIVE, DEAD, OTHER_HOST, UNKNOWN, owner_state, owner_tags

    mine = owner_tags()
    assert owner_state(mine) == ALIVE
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_state(mine | {"runner.owner.pid": gone.stdout.strip()}) == DEAD
    assert owner_state(mine | {"runner.owner.start": mine["runner.owner.start"] + "0"}) == DEAD  # pid reused
    assert owner_state(mine | {"runner.owner.host": "elsewhere"}) == OTHER_HOST
    assert owner_state({}) == UNKNOWN


def test_job_table_says_which_jobs_are_tracked(tmp_path):
    records = _records(tmp_path)
    assert "tracked" not in next(csv.reader(open(write_table(records, tmp_path / "a.csv"))))  # tracking off
    for r in records:
        r.tracked = r.num != 1
    rows = list(csv.DictReader(open(write_table(records, tmp_path / "b.csv"))))
    assert [r["tracked"] for r in rows] == ["yes", "no", "yes", "yes"]


# ------------------------------------------------------------------ the recorder


def test_image_artifacts_are_laid_out_as_mlflow_log_image_does(tmp_path):
    """The writer copies the PNG into MLflow's image-grid layout instead of re-encoding it
    with MlflowClient.log_image: the same names and tag, checked against MLflow itself."""
    import re

    from runner.tracking.runs import image_artifacts

    image = tmp_path / "image.png"
    Image.new("RGB", (96, 64), "red").save(image)
    tracker = Tracker(spec_for(f"tracking.store_dir={tmp_path / 'store'}").tracking, "layout")
    theirs = tracker.start_run("mlflow", {})
    with Image.open(image) as im:
        tracker.client.log_image(theirs, im, key="image", step=0)
    ours = tracker.start_run("runner", {})
    (tmp_path / "up").mkdir()
    tags = image_artifacts(tmp_path / "up", image, "image")
    tracker.log_dir(ours, tmp_path / "up")
    tracker.set_tags(ours, tags)

    def shape(run_id):
        names = sorted(a.path for a in tracker.client.list_artifacts(run_id, "images"))
        return [re.sub(r"\d{13}\+[0-9a-f-]{36}", "T+U", n) for n in names]

    assert shape(ours) == shape(theirs) == ["images/image+step+0+timestamp+T+U+compressed.webp",
                                            "images/image+step+0+timestamp+T+U.png"]
    runs = {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert runs[ours].data.tags["mlflow.loggedImages"] == runs[theirs].data.tags["mlflow.loggedImages"]


def _plan(tmp_path, num, **over):
    from omegaconf import OmegaConf

    from runner.execution import job

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=qwen_image_tiny", f"tracking.store_dir={tmp_path / 'store'}",
                                           f"seed={num}", *[f"{k}={v}" for k, v in over.items()]])
    plan = job.prepare(cfg, num, [f"seed={num}"])
    plan.job_dir = str(tmp_path / str(num))
    assert OmegaConf.is_config(cfg)
    return plan


def test_recorder_logs_from_its_own_process_and_ends_every_run(tmp_path):
    import os

    from runner.execution import job
    from runner.records import SweepRecord
    from runner.tracking.writer import Recorder

    plans = [_plan(tmp_path, n) for n in range(2)]
    recorder = Recorder(plans[0].spec.tracking, "recorder")
    sweep = SweepRecord(name="sweep", tags={"runner.kind": "sweep"}, params={"seed": "0,1"}, started=1.0)
    recorder.start_sweep(sweep)
    records = []
    for plan in plans:
        recorder.job_started(plan)
        record = job.new_record(plan)
        Path(plan.job_dir).mkdir()
        Image.new("RGB", (32, 32), "blue").save(Path(plan.job_dir) / "image.png")
        record.status, record.image_path, record.metrics = FINISHED, str(Path(plan.job_dir) / "image.png"), {"x": 1.0}
        record.ended = record.started + 1
        record.write(Path(plan.job_dir) / "job.json")
        recorder.job_done(record)
        records.append(record)
    recorder.job_started(_plan(tmp_path, 2))  # never done: ended by close
    sweep.status = FINISHED
    recorder.finish_sweep(sweep, [])
    recorder.drain()
    assert all(r.tracked and r.run_id for r in records) and sweep.tracked and sweep.parent_run_id
    assert json.loads((Path(plans[0].job_dir) / "job.json").read_text())["tracked"] is True
    recorder.close(KILLED)

    tracker = Tracker(plans[0].spec.tracking, "recorder")
    runs = {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert runs[sweep.parent_run_id].info.status == FINISHED
    for record in records:
        run = runs[record.run_id]
        assert run.info.status == FINISHED and run.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
        assert run.data.tags["runner.logged"] == "true" and run.data.params["seed"] == str(record.num)
        assert run.data.tags["runner.owner.pid"] == str(os.getpid())  # the driver owns it, not the writer
        artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
        assert {"image.png", "config.yaml", "images"} <= artifacts
    assert sorted(r.info.status for r in runs.values()) == [FINISHED, FINISHED, FINISHED, KILLED]


def test_recorder_on_an_unreachable_server_marks_jobs_untracked(tmp_path):
    import socket

    from runner.execution import job
    from runner.tracking.writer import Recorder

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = _plan(tmp_path, 0, **{"tracking.uri": f"http://127.0.0.1:{port}", "tracking.request_retries": 0})
    recorder = Recorder(plan.spec.tracking, "gone")
    assert recorder.dead and "connect" in recorder.dead
    record = job.new_record(plan)
    record.status = FINISHED
    recorder.job_started(plan)
    recorder.job_done(record)
    recorder.drain()
    recorder.close(KILLED)
    assert record.tracked is False and record.run_id is None


def test_a_deleted_experiment_is_a_config_error_with_the_restore_command(tmp_path):
    from runner.errors import ConfigError

    spec = spec_for(f"tracking.store_dir={tmp_path / 'store'}").tracking
    tracker = Tracker(spec, "old")
    tracker.client.delete_experiment(tracker.experiment_id)
    with pytest.raises(ConfigError, match="mlflow experiments restore --experiment-id") as err:
        Tracker(spec, "old")
    assert err.value.key == "experiment" and "is deleted" in str(err.value)


def test_a_deleted_sqlite_experiment_is_refused_before_the_writer_starts(tmp_path):
    from runner.errors import ConfigError
    from runner.tracking.store import check_sqlite_experiment
    from runner.tracking.writer import Recorder

    spec = spec_for(f"tracking.store_dir={tmp_path / 'store'}").tracking
    uri = f"sqlite:///{(tmp_path / 'store').resolve()}/mlflow.db"
    assert check_sqlite_experiment(uri, "any") is True  # no store yet: the writer creates it
    tracker = Tracker(spec, "old")
    assert check_sqlite_experiment(uri, "old") is True and check_sqlite_experiment(uri, "new") is True
    tracker.client.delete_experiment(tracker.experiment_id)
    with pytest.raises(ConfigError, match="mlflow experiments restore --experiment-id") as err:
        Recorder(spec, "old")
    assert err.value.key == "experiment"
    assert check_sqlite_experiment("http://127.0.0.1:5000", "old") is None  # a server: the writer tells
    (tmp_path / "other.db").write_bytes(b"not a database")
    assert check_sqlite_experiment(f"sqlite:///{tmp_path / 'other.db'}", "old") is None


def test_a_sqlite_recorder_lets_the_run_go_on_while_its_writer_connects(tmp_path, monkeypatch, caplog):
    """The writer imports MLflow and opens the store (seconds) while the run loads its weights:
    Recorder() returns with the writer held in its connection; the job logged meanwhile is
    tracked once it connects. An experiment deleted meanwhile stops the tracking, not the run."""
    from runner.execution import job
    from runner.tracking.writer import Recorder

    monkeypatch.setenv("RUNNER_HOLD", "writer_connect")
    monkeypatch.setenv("RUNNER_HOLD_DIR", str(tmp_path))
    plans = [_plan(tmp_path, n) for n in range(2)]
    spec = plans[0].spec.tracking
    Tracker(spec, "kept"), Tracker(spec, "deleted meanwhile")
    for experiment, plan in zip(("kept", "deleted meanwhile"), plans):
        recorder = Recorder(spec, experiment)  # returns: the writer waits at its connection
        held, deadline = tmp_path / "writer_connect.held", time.monotonic() + 120
        while not held.exists():
            assert time.monotonic() < deadline, "the writer never reached its connection"
            time.sleep(0.01)
        record = job.new_record(plan)
        record.status = FINISHED
        recorder.job_started(plan)
        recorder.job_done(record)
        if experiment == "deleted meanwhile":
            tracker = Tracker(spec, experiment)
            tracker.client.delete_experiment(tracker.experiment_id)
        (tmp_path / "writer_connect.go").touch()
        recorder.drain()
        recorder.close(KILLED)
        held.unlink(), (tmp_path / "writer_connect.go").unlink()
        if experiment == "kept":
            assert record.tracked is True and record.run_id and recorder.dead is None
        else:
            assert record.tracked is False and "is deleted" in recorder.dead
            said = caplog.text  # what went wrong, where, and how to get the jobs logged
            assert "'deleted meanwhile'" in said and "mlflow experiments restore" in said
            assert "python -m runner sync" in said


def _open_store(store: str, barrier) -> str:
    from types import SimpleNamespace

    barrier.wait()  # both processes create the fresh store at the same moment
    tracker = Tracker(SimpleNamespace(uri=None, store_dir=store, artifact_location=None), "together")
    run = tracker.start_run("r", {})
    tracker.end_run(run, FINISHED)
    return run


def test_two_processes_create_a_fresh_store_together(tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        runs = list(pool.map(_open_store, [str(tmp_path / "store")] * 2, [barrier] * 2))
    tracker = Tracker(spec_for(f"tracking.store_dir={tmp_path / 'store'}").tracking, "together")
    assert sorted(r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id])) == sorted(runs)


def test_sync_logs_a_single_run_folder_once(tmp_path, monkeypatch, caplog):
    """A run folder alone (job.json + image) is enough to log the run; a second sync logs
    nothing twice."""
    import logging

    from runner.execution import job
    from runner.tracking.sync import sync_main

    monkeypatch.chdir(tmp_path)
    plan = _plan(tmp_path, 5)
    record = job.new_record(plan)
    Path(plan.job_dir).mkdir()
    gen = {"prompt": "p", "negative_prompt": "", "seed": 5, "steps": 1, "cfg_scale": 1.0, "width": 32, "height": 32,
           "model": "m", "loras": []}
    record.image_path = str(save_png(Image.new("RGB", (32, 32), "green"), Path(plan.job_dir) / "image.png", gen))
    record.status, record.metrics, record.ended, record.tracked = FINISHED, {"total_s": 0.5}, record.started + 1, False
    record.write(Path(plan.job_dir) / "job.json")
    store = tmp_path / "elsewhere"
    with caplog.at_level(logging.INFO, logger="runner"):
        assert sync_main([plan.job_dir, f"tracking.store_dir={store}", "experiment=synced"]) == 0
        assert sync_main([plan.job_dir, f"tracking.store_dir={store}", "experiment=synced"]) == 0
        assert sync_main([str(tmp_path / "nothing")]) == 2
    assert "1 run(s) logged, 0 already" in caplog.text and "0 run(s) logged, 1 already" in caplog.text
    tracker = Tracker(spec_for(f"tracking.store_dir={store}").tracking, "synced")
    [run] = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == FINISHED and run.data.params["seed"] == "5" and run.data.metrics["total_s"] == 0.5
    assert run.data.tags["runner.synced_from"] == str(Path(plan.job_dir).resolve())
    assert run.info.end_time - run.info.start_time == 1000  # the job's own times, not the sync's
    assert {"image.png", "config.yaml", "images"} <= {a.path for a in tracker.client.list_artifacts(run.info.run_id)}


def test_a_ray_sweep_logs_each_launch_with_the_pools_pace():
    from runner.execution.sweep import Pace

    pace = Pace(total=5)
    assert pace.launch() == "1/5, 0 done" and pace.launch() == "2/5, 0 done"
    pace.finished += [10.0, 14.0, 16.0]  # after the first end (a load), 3 s a job at the pool's pace
    assert pace.launch() == "3/5, 3 done, ETA 0:00:06"


# ------------------------------------------- the Ray launcher's units (no Ray needed)


def test_a_free_worker_takes_a_job_whose_weights_it_holds_else_one_nobody_holds():
    from runner.execution.ray.pool import Member, pick
    from runner.execution.sweep import Task

    a, b = Member(actor=None, key="A"), Member(actor=None, key="B")
    jobs = [Task(None, Path("."), key) for key in ("B", "C", "A", "B")]
    assert pick(a, jobs, [a, b]) == 2  # its own weights, though later in the queue
    assert pick(b, jobs, [a, b]) == 0
    fresh = Member(actor=None)  # a new worker (a replacement): weights no other worker holds
    assert pick(fresh, jobs, [a, b, fresh]) == 1
    assert pick(fresh, [Task(None, Path("."), "A")], [a, b, fresh]) == 0  # else the first


@pytest.mark.parametrize("override,key", [("hydra.launcher.num_workers=0", "hydra.launcher.num_workers"),
                                          ("hydra.launcher.threads_per_worker=0", "hydra.launcher.threads_per_worker"),
                                          ("hydra.launcher.max_retries=-1", "hydra.launcher.max_retries"),
                                          ("hydra.launcher.start_timeout_s=0", "hydra.launcher.start_timeout_s")])
def test_launcher_settings_are_checked_naming_the_key(override, key):
    from hydra import compose, initialize_config_dir

    from runner.config import CONF_DIR
    from runner.errors import ConfigError
    from runner.execution.ray.settings import settings_of

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", ["hydra/launcher=ray", override], return_hydra_config=True)
    with pytest.raises(ConfigError) as caught:
        settings_of(config)
    assert caught.value.key == key and "Fix:" in str(caught.value)


def test_a_pool_that_does_not_fit_the_cluster_is_refused_with_the_fix():
    from runner.errors import Stop
    from runner.execution.ray.pool import _sizes
    from runner.execution.ray.settings import RaySettings as Settings

    assert _sizes(Settings(), {"CPU": 16.0, "GPU": 4.0}) == (4, 1.0, 4)  # one worker per GPU
    assert _sizes(Settings(), {"CPU": 2.0}) == (1, 0.0, 2)
    with pytest.raises(Stop) as caught:
        _sizes(Settings(num_workers=3, threads_per_worker=1), {"CPU": 2.0})
    assert "2 CPUs" in caught.value.message and "Fix: lower hydra.launcher.num_workers" in caught.value.message
