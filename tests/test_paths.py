"""Model ids, patterns and hub-listed paths stay inside the models folder: refused in local
resolution, fetch, a LoRA's ModelConfig, a hub listing (loopback hub) and the demo-model
builder; legitimate ids and patterns still work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.core import download
from pipelines.core.download import fetch, resolve_files
from pipelines.core.download_errors import UnsafeListingError, UnsafePathError
from pipelines.core.model_config import ModelConfig
from pipelines.core.repo_paths import check_repo_path, model_folder, path_problem
from tests.support.hub_server import HubServer

SOURCES = ("modelscope", "huggingface")
BAD_IDS = ["../evil", "owner/../../evil", "/tmp/evil", "~/evil", "C:/evil", "c:evil", "owner\\evil", "owner/./name",
           "a/b/c", "owner//name", "owner/name/", "", ".diffsynth/manifests", "owner/na:me"]
BAD_PATTERNS = ["../*.safetensors", "weights/../../*", "/etc/passwd", "~/x.safetensors", "C:/x", "weights\\x",
                "./weights/*", "weights//x", ""]
GOOD_IDS = ["Qwen/Qwen-Image", "tiny/Qwen-Image-Tiny", "gpt2", "DiffSynth-Studio/Qwen-Image-LoRA-ArtAug-v1",
            "owner/name.v1.5", "owner/..name"]
GOOD_PATTERNS = ["*", "weights/*.safetensors", "**/config.json", "tokenizer/", "model-0000[12]-of-*.safetensors",
                 "weights/..hidden", "a/**/b/*.json"]


class _NoHub(dict):
    def __getitem__(self, key):
        raise AssertionError("a refused path must not reach any hub")


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "HUBS", _NoHub())
    return tmp_path / "sandbox" / "models"


def everything(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def test_the_check_itself():
    for value in GOOD_IDS:
        assert path_problem(value, "model_id") is None and check_repo_path(value, "model_id") == value
    for value in GOOD_PATTERNS:
        assert path_problem(value, "pattern") is None
    for value in BAD_IDS:
        assert path_problem(value, "model_id") is not None, value
    for value in BAD_PATTERNS + ["weights/"]:
        assert path_problem(value, "file") is not None, value  # a listed file is never a folder
    for value in BAD_PATTERNS:
        assert path_problem(value, "pattern") is not None, value
    with pytest.raises(UnsafePathError) as error:
        check_repo_path("../x", "model_id", " (here)")
    assert (error.value.value, error.value.what, error.value.problem) == ("../x", "model_id", "has a '..' segment")
    assert "(here)" in str(error.value) and "owner/name" in str(error.value)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("model_id", BAD_IDS)
def test_resolve_and_fetch_refuse_a_model_id_outside_the_models_folder(base, model_id, skip):
    c = ModelConfig(model_id=model_id, origin_file_pattern="*.safetensors", local_model_path=base, skip_download=skip)
    for call in (lambda: resolve_files(c), lambda: fetch([c])):
        with pytest.raises(UnsafePathError) as error:
            call()
        message = str(error.value)
        for part in (repr(model_id), "'*.safetensors'", "source=modelscope", str(base.absolute()), "owner/name"):
            assert part in message, f"{part!r} missing from: {message}"
    assert not base.parent.exists()  # nothing written anywhere (no lock, no manifest, no folder)


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_resolve_and_fetch_refuse_a_pattern_outside_the_repo(base, pattern):
    for skip in (True, False):
        c = ModelConfig(model_id="owner/name", origin_file_pattern=["weights/*", pattern], local_model_path=base,
                        skip_download=skip)
        for call in (lambda: resolve_files(c), lambda: fetch([c])):
            with pytest.raises(UnsafePathError, match="origin_file_pattern .*relative to the repo root") as error:
                call()
            assert "'owner/name'" in str(error.value) and str(base.absolute()) in str(error.value)
    assert not base.parent.exists()


def test_a_lora_model_config_is_checked_too(base):
    from pipelines.core.lora import read_lora

    with pytest.raises(UnsafePathError, match="'../lora'"):
        read_lora(ModelConfig(model_id="../lora", origin_file_pattern="*.safetensors", local_model_path=base))


def test_legitimate_ids_and_patterns_resolve(base):
    for model_id in GOOD_IDS:
        folder = base / model_id / "weights"
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        (folder / "..hidden").write_text("x")
        c = ModelConfig(model_id=model_id, origin_file_pattern=["weights/*.safetensors", "weights/..hidden"],
                        local_model_path=base, skip_download=True)
        assert resolve_files(c) == [folder / "model.safetensors", folder / "..hidden"]
        assert model_folder(c) == base / model_id


def test_the_builder_refuses_a_folder_outside(tmp_path):
    from pipelines.demo.qwen_image_tiny import build_tiny_repo

    models = tmp_path / "models"
    for model_id in ("../escape", "tiny/../../escape"):
        with pytest.raises(UnsafePathError, match="model_id"):  # what the runner's ensure_built asks first
            model_folder(ModelConfig(model_id=model_id, local_model_path=models))
        with pytest.raises(ValueError, match=r"'\.\.' segment.*nothing was written"):
            build_tiny_repo(models / model_id)
    assert everything(tmp_path) == set()
    assert model_folder(ModelConfig(model_id="tiny/Qwen-Image-Tiny", local_model_path=models)) == \
        models / "tiny" / "Qwen-Image-Tiny"


# ---------------------------------------------------------------------- a hub whose listing points outside


@pytest.fixture
def small_repo(tmp_path) -> Path:
    repo = tmp_path / "served" / "repo"
    (repo / "weights").mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, str(repo / "weights" / "model.safetensors"))
    (repo / "weights" / "config.json").write_text(json.dumps({"dim": 4}))
    return repo


@pytest.fixture
def hub_env(small_repo, tmp_path, monkeypatch):
    for name in ("DIFFSYNTH_SKIP_DOWNLOAD", "DIFFSYNTH_DOWNLOAD_SOURCE", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    base = tmp_path / "sandbox" / "models"
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope_cache"))
    with HubServer({"owner/name": small_repo}) as hub:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub, base


@pytest.mark.parametrize("source", SOURCES)
def test_a_legitimate_small_repo_is_fetched(hub_env, source):
    hub, base = hub_env
    files = resolve_files(ModelConfig(model_id="owner/name", origin_file_pattern="weights/*.safetensors",
                                      download_source=source))
    assert files == [base / "owner/name/weights/model.safetensors"]
    assert (base / "owner/name/weights/config.json").is_file()


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("listed", ["../evil.txt", "weights/../../../evil.txt", "weights/./evil.txt",
                                    "C:/evil.txt", "weights\\..\\..\\evil.txt"])
def test_a_listing_that_points_outside_is_refused(hub_env, tmp_path, source, listed):
    hub, base = hub_env
    hub.add_file("owner/name", listed, b"evil", tmp_path / "extra")
    c = ModelConfig(model_id="owner/name", origin_file_pattern=["weights/*.safetensors", "**/*.txt"],
                    download_source=source)
    for call in (lambda: resolve_files(c), lambda: fetch([c])):
        with pytest.raises(UnsafeListingError) as error:
            call()
        message = str(error.value)
        for part in (repr(listed), "'owner/name'", source, hub.url, str((base / "owner/name").absolute()),
                     "Nothing was fetched"):
            assert part in message, f"{part!r} missing from: {message}"
        assert isinstance(error.value, OSError) and isinstance(error.value, ValueError)
    assert hub.file_requests() == []  # nothing asked for, so nothing written
    assert everything(tmp_path / "sandbox") <= {"models"}  # no staging, no lock, no kept listing
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []


def test_a_kept_listing_that_points_outside_is_ignored(tmp_path, caplog):
    base = tmp_path / "models"
    folder = base / "owner/name/weights"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    manifest = base / ".diffsynth/manifests/owner/name.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"files": {"../../../evil.safetensors": {"size": 1},
                                              "weights/model.safetensors": {"size": 1}}}))
    c = ModelConfig(model_id="owner/name", origin_file_pattern="**/*.safetensors", local_model_path=base,
                    skip_download=True)
    assert resolve_files(c) == [folder / "model.safetensors"]  # from the folder, not the tampered listing
    assert "Ignoring the kept listing" in caplog.text
