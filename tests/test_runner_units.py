"""Runner parts without a model: the pipeline cache and LoRA switching (on a stand-in
pipeline), PNG metadata, contact sheet and job table, provenance, and the MLflow tracker
against a real SQLite store."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from pipelines import Pipeline
from runner import build
from runner.app import CONF_DIR
from runner.provenance import FingerprintCache, git_commit, package_versions
from runner.report import JobRecord, contact_sheet, read_generation, save_png, swept_keys, write_table
from runner.spec import register_configs, to_spec
from runner.tracking import FAILED, FINISHED, KILLED, Tracker, default_artifact_location, flatten, store_uri

register_configs()


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
        build.apply_loras(entry, spec)
        assert pipe.calls[before:] == expected, overrides
    assert FakePipeline.loads == 1

    # after a failed job the applied LoRAs are unknown: the next job clears first
    build.forget_lora_state(entry)
    before = len(pipe.calls)
    build.apply_loras(entry, spec_for())
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
    from runner.spec import ConfigError

    assert not FakePipeline.supports_vram_management
    with pytest.raises(ConfigError, match="vram=none") as err:
        build.preflight(spec_for(f"vram={preset}"))
    assert err.value.key == "vram" and preset in str(err.value)
    build.preflight(spec_for("vram=none"))


def test_ensure_built_builds_once_under_a_lock(tmp_path, monkeypatch):
    calls = []

    def builder(out):
        calls.append(out)
        (Path(out) / "model_index.json").parent.mkdir(parents=True)
        (Path(out) / "model_index.json").write_text("{}")
        return out

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setattr(build, "import_object", lambda dotted, where: builder)
    spec = spec_for("model.build=some.builder")
    build.ensure_built(spec)
    build.ensure_built(spec)
    assert calls == [tmp_path / "tiny" / "Qwen-Image-Tiny"]


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


def test_contact_sheet_is_a_labelled_grid(tmp_path):
    records = _records(tmp_path)
    assert swept_keys(records) == ["seed", "lora.alpha"]
    sheet = contact_sheet(records, thumb=64)
    assert sheet.width == 2 * (64 + 8) and sheet.height > 2 * (64 + 8)  # 2 x 2, labels under the cells
    # the failed cell is grey, the others show their image
    assert sheet.getpixel((4 + 72 + 60, 4 + 10)) == (60, 0, 0)
    cell_h = sheet.height // 2
    assert sheet.getpixel((4 + 2, cell_h + 4 + 2)) == (200, 200, 200)


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
    assert len(runs[child].data.params["long"]) == 6000
    assert not (tmp_path / "mlruns").exists()


def test_artifact_location_for_a_server_is_left_to_the_server():
    spec = spec_for("tracking.uri=http://127.0.0.1:5000").tracking
    assert default_artifact_location(spec, "x") is None


def test_contact_sheet_config_json_roundtrip(tmp_path):
    # the PNG text chunk is JSON: non-ASCII prompts survive
    gen = {"prompt": "猫 — café", "negative_prompt": " ", "seed": 0, "steps": 1, "cfg_scale": 1.0,
           "width": 16, "height": 16, "sampler": "lightning", "model": "m", "loras": []}
    path = save_png(Image.new("RGB", (16, 16)), tmp_path / "i.png", gen)
    assert read_generation(path)["prompt"] == "猫 — café"
    assert json.loads(Image.open(path).text["generation"])["sampler"] == "lightning"


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    from runner.report import atomic_write

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "jobs.csv", broken)
    assert list(tmp_path.iterdir()) == []
    atomic_write(tmp_path / "jobs.csv", lambda tmp: tmp.write_text("ok"))
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.csv"] and (tmp_path / "jobs.csv").read_text() == "ok"
