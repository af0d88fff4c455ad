"""Model download against a hub on loopback (tests.support.hub_server): the real
`modelscope` and `huggingface_hub` clients fetch the tiny Qwen-Image repo from it, with faults
injected; no network beyond 127.0.0.1."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.core import download
from pipelines.core.download import fetch, resolve_files
from pipelines.core.download_errors import CorruptModelFileError, DownloadError, MissingModelFilesError
from pipelines.core.hubs import HuggingFaceHub, ModelScopeHub, RemoteUnavailable, classify
from pipelines.core.model_config import ModelConfig
from pipelines.core.repo_paths import download_source, matches, model_base_path, parse_download_source, skip_download
from tests.support.hub_server import Fault, HubServer

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "Qwen/Qwen-Image-Tiny"
SOURCES = ("modelscope", "huggingface")
TE1 = "text_encoder/model-00001-of-00002.safetensors"  # 19.5 MB
DIT1, DIT2 = (f"transformer/diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2))
VAE = "vae/diffusion_pytorch_model.safetensors"
DIT_CONFIG, TE_CONFIG, VAE_CONFIG = "transformer/config.json", "text_encoder/config.json", "vae/config.json"
TOKENIZER_FILES = {f"tokenizer/{n}" for n in ("added_tokens.json", "merges.txt", "special_tokens_map.json",
                                              "tokenizer.json", "tokenizer_config.json", "vocab.json")}
VARIABLES = ("DIFFSYNTH_SKIP_DOWNLOAD", "DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_MODEL_BASE_PATH",
             "MODELSCOPE_DOMAIN", "MODELSCOPE_ENDPOINT", "HF_ENDPOINT")


@pytest.fixture(scope="module")
def hub(tiny_repo):
    with HubServer({MODEL_ID: tiny_repo}) as server:
        yield server


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """Both clients pointed at the hub, models under tmp_path, quick retries."""
    hub.clear_faults()
    hub.clear_requests()
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    base = tmp_path / "models"
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope_cache"))
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.05)
    # the ModelScope client's own backoff (5 retries up to 16 s apart): keep a persistent fault short
    import modelscope_hub._download as ms_download

    monkeypatch.setattr(ms_download, "DOWNLOAD_RETRY_TIMES", 1, raising=False)
    monkeypatch.setattr(ms_download, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.01, raising=False)
    yield SimpleNamespace(hub=hub, base=base, root=base / MODEL_ID, tmp=tmp_path)
    hub.clear_faults()
    hub.gate(MODEL_ID, None)


def config(pattern, **kwargs) -> ModelConfig:
    return ModelConfig(model_id=MODEL_ID, origin_file_pattern=pattern, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean(env) -> set[str]:
    """Every file under the model folder is complete and right (no partial or foreign file under
    a final name); returns their repo paths."""
    repo = env.hub.repo(MODEL_ID)
    found = set()
    if env.root.exists():
        for path in env.root.rglob("*"):
            if path.is_file():
                rel = path.relative_to(env.root).as_posix()
                assert rel in repo.files, f"{rel} is not a file of the repo (a partial or temporary file?)"
                assert sha256(path) == repo.files[rel].sha256, f"{rel} under its final name differs from the hub's"
                found.add(rel)
    return found


def assert_names_everything(message: str, pattern: str, source: str, root: Path, model_id: str = MODEL_ID) -> None:
    for part in (model_id, pattern, source, str(root.absolute())):
        assert part in message, f"{part!r} missing from the error: {message}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the server speaks both protocols


def test_the_real_clients_fetch_from_the_test_hub(env, tiny_repo):
    from huggingface_hub import hf_hub_download
    from huggingface_hub import snapshot_download as hf_snapshot_download
    from modelscope.hub.snapshot_download import snapshot_download as ms_snapshot_download

    # the endpoint given explicitly, as the library does: the client reads MODELSCOPE_ENDPOINT once per
    # process, so a hub server of an earlier test module would be asked otherwise
    ms_dir = Path(ms_snapshot_download(MODEL_ID, local_dir=str(env.tmp / "ms"), allow_patterns=["transformer/*"],
                                       endpoint=env.hub.url))
    hf_cache = str(env.tmp / "hf_cache")  # not the user's ~/.cache
    hf_dir = Path(hf_snapshot_download(MODEL_ID, local_dir=str(env.tmp / "hf"), allow_patterns=["transformer/*"],
                                       endpoint=env.hub.url, cache_dir=hf_cache))
    one = Path(hf_hub_download(MODEL_ID, "vae/config.json", local_dir=str(env.tmp / "one"), endpoint=env.hub.url,
                               cache_dir=hf_cache))
    expected = sorted(p.relative_to(tiny_repo).as_posix() for p in (tiny_repo / "transformer").iterdir())
    for folder in (ms_dir, hf_dir):
        got = sorted(p.relative_to(folder).as_posix() for p in (folder / "transformer").iterdir())
        assert got == expected
        assert all(sha256(folder / p) == sha256(tiny_repo / p) for p in got)
    assert one.read_bytes() == (tiny_repo / "vae" / "config.json").read_bytes()
    assert {r.protocol for r in env.hub.requests if r.kind != "unknown"} == {"modelscope", "huggingface"}


# ---------------------------------------------------------------------- fetch, then load and generate


@pytest.mark.parametrize("source", SOURCES)
def test_fetch_then_load_and_generate(env, source, monkeypatch, tiny_repo):
    from pipelines.qwen_image import QwenImagePipeline

    if source == "huggingface":
        monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "huggingface")  # else ModelScope, the default
    weights = ["transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
               "vae/diffusion_pytorch_model.safetensors"]
    # the tiny model's sizes are not the real ones: only the config.json beside the weights (fetched
    # with them, though no pattern names it) has them
    pipe = QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[config(p) for p in weights],
                                             tokenizer_config=config("tokenizer/"))
    args = dict(height=64, width=64, seed=0, num_inference_steps=2, progress_bar=False)
    image = pipe("a red fox in the snow", **args)
    assert image.size == (64, 64)

    configs_json = {DIT_CONFIG, TE_CONFIG, VAE_CONFIG}
    wanted = {DIT1, DIT2, TE1, "text_encoder/model-00002-of-00002.safetensors", VAE} | TOKENIZER_FILES | configs_json
    assert {r.path for r in env.hub.file_requests()} == wanted  # only what the patterns need, once each
    assert len(env.hub.file_requests()) == len(wanted)
    assert {r.protocol for r in env.hub.requests if r.kind != "unknown"} == {source}
    assert assert_clean(env) == wanted
    staging = env.base / ".diffsynth" / "staging"
    assert not staging.exists() or not any(staging.rglob("*"))

    # the same model loaded from a full local folder: the same files beside the weights, the same image
    full = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(model_id="tiny/Qwen-Image-Tiny", origin_file_pattern=p, skip_download=True,
                                   local_model_path=tiny_repo.parent.parent) for p in weights],
        tokenizer_config=ModelConfig(model_id="tiny/Qwen-Image-Tiny", origin_file_pattern="tokenizer/",
                                     skip_download=True, local_model_path=tiny_repo.parent.parent))
    for folder in ("transformer", "text_encoder", "vae"):
        assert sorted(p.name for p in (env.root / folder).iterdir()) == sorted(
            p.name for p in (tiny_repo / folder).iterdir() if p.suffix != ".json" or p.name == "config.json")
    assert (np.asarray(full("a red fox in the snow", **args)) == np.asarray(image)).all()

    env.hub.clear_requests()  # the next load asks the hub, and fetches nothing again
    for p in weights:
        files = resolve_files(config(p))
        assert files and all(f.suffix == ".safetensors" for f in files)  # config.json is not handed back
    assert env.hub.file_requests() == []
    assert any(r.kind == "listing" for r in env.hub.requests)


def test_the_config_json_beside_the_weights_comes_with_them(env, monkeypatch):
    c = config("transformer/diffusion_pytorch_model*.safetensors")
    summary = fetch([c])
    assert sorted(f.path for f in summary.fetched) == sorted([DIT1, DIT2, DIT_CONFIG])
    assert resolve_files(c) == [env.root / DIT1, env.root / DIT2]  # the weights only, as before
    assert assert_clean(env) == {DIT1, DIT2, DIT_CONFIG}
    # a pattern that names no weight brings no config.json; a root pattern finds no root config.json
    assert resolve_files(config("transformer/*.index.json")) == [
        env.root / "transformer/diffusion_pytorch_model.safetensors.index.json"]
    assert resolve_files(config("tokenizer/vocab.json")) == [env.root / "tokenizer/vocab.json"]
    assert assert_clean(env) == {DIT1, DIT2, DIT_CONFIG, "transformer/diffusion_pytorch_model.safetensors.index.json",
                                 "tokenizer/vocab.json"}

    # a config.json deleted locally is fetched again; offline, its absence is no error
    (env.root / DIT_CONFIG).unlink()
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    assert resolve_files(c) == [env.root / DIT1, env.root / DIT2]
    assert not (env.root / DIT_CONFIG).exists()
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD")
    env.hub.clear_requests()
    assert resolve_files(c) == [env.root / DIT1, env.root / DIT2]
    assert [r.path for r in env.hub.file_requests()] == [DIT_CONFIG]
    assert sha256(env.root / DIT_CONFIG) == env.hub.repo(MODEL_ID).files[DIT_CONFIG].sha256

    # it is checked like any file: one of the wrong size is an error, online and offline
    (env.root / DIT_CONFIG).write_text("{}")
    with pytest.raises(CorruptModelFileError, match="config.json"):
        resolve_files(c)
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    with pytest.raises(CorruptModelFileError, match="config.json"):
        resolve_files(c)


# ---------------------------------------------------------------------- patterns


@pytest.mark.parametrize("pattern, expected", [
    ("transformer/*.json", {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json"}),
    (["scheduler/", "model_index.json"], {"scheduler/scheduler_config.json", "model_index.json"}),
    ("**/config.json", {"transformer/config.json", "text_encoder/config.json", "vae/config.json"}),
    ("*.json", {"model_index.json"}),  # `*` stays in one folder, as in Path.glob
])
def test_only_the_files_matching_the_patterns_are_fetched(env, pattern, expected):
    files = resolve_files(config(pattern))
    assert {r.path for r in env.hub.file_requests()} == expected
    assert assert_clean(env) == expected
    if "scheduler/" in pattern:  # a folder pattern resolves to the folder
        assert env.root / "scheduler" in files
    else:
        assert sorted(files) == sorted(env.root / p for p in expected)


def test_pattern_semantics():
    assert matches("vae/x.safetensors", "vae/*.safetensors")
    assert not matches("vae/sub/x.safetensors", "vae/*.safetensors")
    assert matches("vae/sub/x.safetensors", "vae/**/*.safetensors") and matches("vae/x.safetensors",
                                                                                "vae/**/*.safetensors")
    assert matches("tokenizer/vocab.json", "tokenizer/") and matches("tokenizer/a/b.txt", "tokenizer/")
    assert not matches("tokenizer2/vocab.json", "tokenizer/")
    assert matches("model-00001-of-00002.safetensors", "model-0000[12]-of-*.safetensors")


def test_fetch_lists_each_model_once_and_summarises(env, caplog):
    configs = [config(DIT1, download_source="huggingface"),
               config("transformer/*.safetensors", download_source="huggingface"), None, ModelConfig(path=str(env.tmp))]
    with caplog.at_level(logging.INFO, logger="pipelines.core.download"):
        summary = fetch(configs)
    assert sorted(f.path for f in summary.fetched) == sorted([DIT1, DIT2, DIT_CONFIG]) and summary.present == 0
    assert len([r for r in env.hub.requests if r.kind == "listing"]) == 1
    assert "fetched 3 file(s)" in caplog.text and DIT2 in caplog.text
    again = fetch(configs)
    assert again.fetched == [] and again.present == 3


# ---------------------------------------------------------------------- variables, fields, precedence


def test_precedence_of_fields_variables_and_defaults(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    plain = ModelConfig(model_id="a/b")
    assert (model_base_path(plain), download_source(plain), skip_download(plain)) == (Path("./models"), "modelscope",
                                                                                      False)

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "variable"))
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace")
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    assert (model_base_path(plain), download_source(plain), skip_download(plain)) == (tmp_path / "variable",
                                                                                      "huggingface", True)

    fields = ModelConfig(model_id="a/b", local_model_path=tmp_path / "field", download_source="modelscope",
                         skip_download=False)
    assert (model_base_path(fields), download_source(fields), skip_download(fields)) == (tmp_path / "field",
                                                                                         "modelscope", False)

    for word, value in (("1", True), ("yes", True), ("false", False), ("0", False), ("", False)):
        monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", word)
        assert skip_download(plain) is value
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "maybe")
    with pytest.raises(ValueError, match="DIFFSYNTH_SKIP_DOWNLOAD='maybe'"):
        skip_download(plain)
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD")

    with pytest.raises(ValueError, match=r"download_source='github'.*allowed: modelscope, huggingface"):
        download_source(ModelConfig(model_id="a/b", download_source="github"))
    assert download_source(ModelConfig(model_id="a/b", download_source=" ModelScope ")) == "modelscope"
    assert parse_download_source("HuggingFace", "model.download_source") == "huggingface"
    for bad in ("github", "", None, 3, "hugging face"):
        with pytest.raises(ValueError, match=r"^model\.download_source=.* is not a download source; allowed: "
                                             r"modelscope, huggingface"):
            parse_download_source(bad, "model.download_source")
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "s3")
    with pytest.raises(ValueError, match=r"DIFFSYNTH_DOWNLOAD_SOURCE='s3'.*allowed: modelscope, huggingface"):
        resolve_files(plain)

    # endpoints follow each client's own variables, read at each call
    monkeypatch.setenv("HF_ENDPOINT", "http://hf-mirror.example:8080/")
    assert HuggingFaceHub().endpoint == "http://hf-mirror.example:8080"
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://ms-mirror.example:9000")
    assert ModelScopeHub().endpoint == "http://ms-mirror.example:9000"
    monkeypatch.delenv("MODELSCOPE_ENDPOINT")
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "ms-domain.example")  # deprecated, https only
    with pytest.warns(FutureWarning, match="MODELSCOPE_DOMAIN"):
        assert ModelScopeHub().endpoint == "https://ms-domain.example"


def test_fields_win_over_variables_when_fetching(env, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "modelscope")
    field_base = env.tmp / "field_base"
    files = resolve_files(config(DIT1, download_source="huggingface", local_model_path=field_base))
    assert files == [field_base / MODEL_ID / DIT1]
    assert {r.protocol for r in env.hub.requests if r.kind != "unknown"} == {"huggingface"}
    assert not env.root.exists()


# ---------------------------------------------------------------------- skip download, no server


class _NoHub(dict):
    def __getitem__(self, key):
        raise AssertionError("skip-download must not touch any hub")


def test_skip_download_makes_no_network_call(env, monkeypatch):
    resolve_files(config("transformer/*.safetensors"))
    env.hub.clear_requests()
    monkeypatch.setattr(download, "HUBS", _NoHub())
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    assert resolve_files(config("transformer/*.safetensors")) == [env.root / DIT1, env.root / DIT2]

    (env.root / DIT2).unlink()  # the last listing (kept beside the models) names what is missing
    with pytest.raises(MissingModelFilesError) as error:
        resolve_files(config("transformer/*.safetensors"))
    message = str(error.value)
    listed = message.split(f"{env.root}: ", 1)[1].split(" (model_id=")[0]
    assert listed == DIT2 and "DIFFSYNTH_SKIP_DOWNLOAD" in message
    assert_names_everything(message, "transformer/*.safetensors", "modelscope", env.root)

    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD")  # the field alone, for a model never listed
    with pytest.raises(MissingModelFilesError, match="anything matching 'vae/'") as error:
        resolve_files(ModelConfig(model_id="other/model", origin_file_pattern="vae/", skip_download=True))
    assert_names_everything(str(error.value), "vae/", "modelscope", env.base / "other/model", "other/model")
    assert env.hub.requests == []


@pytest.mark.parametrize("source", SOURCES)
def test_no_server_at_all(env, source, monkeypatch, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", dead)
    monkeypatch.setenv("HF_ENDPOINT", dead)
    c = config("transformer/*.safetensors", download_source=source)
    with pytest.raises(MissingModelFilesError) as error:
        resolve_files(c)
    message = str(error.value)
    assert "cannot connect" in message and dead in message and error.value.kind == "unreachable"
    assert "Check the network" in message
    assert_names_everything(message, "transformer/*.safetensors", source, env.root)
    assert assert_clean(env) == set()

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", env.hub.url)  # the hub is back: a later run succeeds
    monkeypatch.setenv("HF_ENDPOINT", env.hub.url)
    assert len(resolve_files(c)) == 2

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", dead)  # gone again, but every file is local: a warning
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with caplog.at_level(logging.WARNING, logger="pipelines.core.download"):
        assert resolve_files(c) == [env.root / DIT1, env.root / DIT2]
    assert "Could not ask" in caplog.text and "going on" in caplog.text


def test_a_pattern_the_hub_does_not_have(env):
    with pytest.raises(MissingModelFilesError) as error:
        resolve_files(config("transformer/*.bin"))
    assert_names_everything(str(error.value), "transformer/*.bin", "modelscope", env.root)


# ---------------------------------------------------------------------- what the hub answered


def hub_requests(env) -> list:
    """The requests of either protocol (not the client's own side requests)."""
    return [r for r in env.hub.requests if r.protocol != "other"]


@pytest.mark.parametrize("source", SOURCES)
def test_a_model_the_hub_does_not_have_is_named_as_such(env, source, caplog):
    other = next(s for s in SOURCES if s != source)
    c = ModelConfig(model_id="nobody/nothing", origin_file_pattern="*.safetensors", download_source=source)
    with pytest.raises(MissingModelFilesError) as error:
        resolve_files(c)
    message = str(error.value)
    assert error.value.kind == "not_found"
    for part in ("has no model 'nobody/nothing'", "HTTP 404", "Check model_id", f"download_source={other!r}",
                 env.hub.url):
        assert part in message, f"{part!r} missing from: {message}"
    assert "network" not in message
    assert_names_everything(message, "*.safetensors", source, env.base / "nobody/nothing", "nobody/nothing")
    assert [r.status for r in hub_requests(env)] == [404]  # asked once: a 404 is not retried

    # every needed file already on disk (a model removed or renamed on the hub): a warning
    folder = env.base / "nobody" / "nothing"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(env.hub.repo(MODEL_ID).files[VAE].local.read_bytes())
    with caplog.at_level(logging.WARNING, logger="pipelines.core.download"):
        summary = fetch([c])
    assert resolve_files(c) == [folder / "model.safetensors"]
    assert "has no model 'nobody/nothing'" in caplog.text and "going on with them" in caplog.text
    assert summary.offline and "not_found" in summary.offline[0]


def assert_says_log_in(message: str, source: str) -> None:
    assert "gated or private" in message and "licence" in message and "network" not in message
    if source == "huggingface":
        assert "HF_TOKEN" in message and "hf auth login" in message and "huggingface-cli login" in message
    else:
        assert "MODELSCOPE_API_TOKEN" in message and "modelscope login" in message


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_or_private_repo_says_log_in(env, source, status, caplog, monkeypatch):
    env.hub.gate(MODEL_ID, status, token="hf_test_token")
    c = config(VAE, download_source=source)
    with pytest.raises(MissingModelFilesError) as error:
        resolve_files(c)
    message = str(error.value)
    assert error.value.kind == "unauthorized" and f"HTTP {status}" in message
    assert_says_log_in(message, source)
    assert_names_everything(message, VAE, source, env.root)
    assert [r.status for r in hub_requests(env)] == [status]  # asked once: never retried
    assert assert_clean(env) == set()

    # with the token the hub wants, it goes through
    monkeypatch.setenv("HF_TOKEN" if source == "huggingface" else "MODELSCOPE_API_TOKEN", "hf_test_token")
    assert resolve_files(c) == [env.root / VAE]
    monkeypatch.delenv("HF_TOKEN" if source == "huggingface" else "MODELSCOPE_API_TOKEN")

    # every needed file on disk: a warning that says what the hub answered
    with caplog.at_level(logging.WARNING, logger="pipelines.core.download"):
        summary = fetch([c])
    assert summary.offline and "unauthorized" in summary.offline[0] and summary.present == 1
    assert "refused access" in caplog.text and "going on with them" in caplog.text


@pytest.mark.parametrize("source", SOURCES)
def test_a_gated_repo_with_a_public_listing_says_log_in(env, source):
    env.hub.gate(MODEL_ID, 403, files_only=True)  # as huggingface.co serves a gated repo
    with pytest.raises(DownloadError) as error:
        resolve_files(config("vae/*", download_source=source))
    message = str(error.value)
    assert error.value.kind == "unauthorized" and "after 1 attempt(s)" in message  # not retried
    assert_says_log_in(message, source)
    assert_names_everything(message, "vae/*", source, env.root)
    assert all(r.status == 403 for r in env.hub.requests if r.kind in ("file", "head"))
    assert assert_clean(env) == set()


def test_a_server_error_is_named_as_such(env):
    env.hub.add_fault(Fault("status", on="listing", times=None, status=503))
    with pytest.raises(MissingModelFilesError) as error:
        resolve_files(config(VAE, download_source="huggingface"))
    message = str(error.value)
    assert error.value.kind == "server_error" and "server error" in message and "load again later" in message
    assert "network" not in message
    assert len(hub_requests(env)) == download.RETRIES + 1  # a 5xx is retried


def test_classify_what_the_clients_raise():
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise httpx.ConnectError("connection refused")
        except httpx.ConnectError as cause:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from cause
    except LocalEntryNotFoundError as error:
        assert classify(error) == ("unreachable", None)  # a "not found" in name only
    assert classify(TimeoutError("timed out")) == ("unreachable", None)
    assert classify(ValueError("not JSON")) == ("other", None)
    assert RemoteUnavailable("x", True, "not_found", 404).retryable is False
    with pytest.raises(ValueError, match="kind"):
        RemoteUnavailable("x", kind="nope")


# ---------------------------------------------------------------------- faults


FAULTS = {
    # past the HuggingFace client's 10 MB read chunk, so that it has bytes to resume from
    "connection dropped mid-file": (Fault("drop", TE1, after_bytes=12 << 20), True),
    "HTTP 500 then success": (Fault("status", TE1), False),
    "HTTP 500 on the listing then success": (Fault("status", on="listing"), False),
    "wrong size": (Fault("short", TE1), False),
    "wrong hash": (Fault("corrupt", TE1), False),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", FAULTS)
def test_a_transient_fault_ends_in_recovery(env, source, name):
    fault, resumes = FAULTS[name]
    env.hub.add_fault(dataclasses.replace(fault, hits=0))
    assert resolve_files(config(TE1, download_source=source)) == [env.root / TE1]
    assert assert_clean(env) == {TE1, TE_CONFIG}
    gets = env.hub.file_requests(TE1)
    if fault.on == "listing":
        assert any(r.fault for r in env.hub.requests) and len(gets) == 1
    else:
        assert gets[0].fault == fault.kind and len(gets) >= 2
    if resumes:  # the second request asked for the rest only
        assert gets[1].range_start and gets[1].range_start > 0


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", ["status", "short", "corrupt"])
def test_a_persistent_fault_is_a_clear_error_and_a_later_run_succeeds(env, source, kind):
    env.hub.add_fault(Fault(kind, DIT1, times=None))
    c = config("transformer/*.safetensors", download_source=source)
    with pytest.raises(DownloadError) as error:
        resolve_files(c)
    message = str(error.value)
    assert DIT1 in message and "Load again" in message
    assert_names_everything(message, "transformer/*.safetensors", source, env.root)
    assert assert_clean(env) <= {DIT2, DIT_CONFIG} and not (env.root / DIT1).exists()
    assert error.value.kind == ("server_error" if kind == "status" else "other")  # other: wrong size or hash

    env.hub.clear_faults()
    assert resolve_files(c) == [env.root / DIT1, env.root / DIT2]
    assert assert_clean(env) == {DIT1, DIT2, DIT_CONFIG}


def test_a_corrupt_local_file_is_detected_before_loading(env, monkeypatch):
    c = config(VAE)
    [path] = resolve_files(c)
    good = path.read_bytes()
    path.write_bytes(good[:-1000])  # truncated
    with pytest.raises(CorruptModelFileError) as error:
        resolve_files(c)  # online: the size differs from the hub's listing
    message = str(error.value)
    assert str(path) in message and "Delete it and load again" in message
    assert_names_everything(message, VAE, "modelscope", env.root)

    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")  # offline: the kept listing says the same
    with pytest.raises(CorruptModelFileError, match="bytes but the hub listed"):
        resolve_files(c)
    for manifest in (env.base / ".diffsynth" / "manifests").rglob("*.json"):
        manifest.unlink()
    with pytest.raises(CorruptModelFileError, match="cannot read it"):  # no listing: the header check
        resolve_files(c)

    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD")
    path.write_bytes(b"\xff" * 8 + good[8:])  # right size, broken header
    with pytest.raises(CorruptModelFileError, match="cannot read it"):
        resolve_files(c)
    path.unlink()  # what the message says to do: the next load fetches it again
    assert resolve_files(c) == [path] and path.read_bytes() == good


# ---------------------------------------------------------------------- processes
#
# Synchronised on events, never on time or speed: files a child writes when it is ready, the hub
# holding a transfer until the test releases it (`HeldTransfer`), a line a child logs.


FETCH_SCRIPT = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from pipelines.core.download import fetch
from pipelines.core.model_config import ModelConfig
ready, go, deadline = os.environ.get("READY_FILE"), os.environ.get("GO_FILE"), time.monotonic() + 120
if ready:
    open(ready, "w").close()
while go and not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
summary = fetch([ModelConfig(model_id=sys.argv[1], origin_file_pattern=p, download_source=sys.argv[2])
                 for p in sys.argv[3:]])
print(json.dumps({"fetched": sorted(f.path for f in summary.fetched), "present": summary.present}))
"""
EVENT_TIMEOUT_S = 120  # only a broken test waits this long: every wait below ends on an event


class HeldTransfer(Fault):
    """A `slow` fault whose pause before each chunk of a matching file is a wait on an event, not a
    time: the first `pass_chunks` chunks (of hub_server.CHUNK bytes) go out, then the transfer
    holds (`held` is set) until `release()`. The server reads `delay` once per chunk."""

    def __init__(self, pattern: str, pass_chunks: int = 0):
        super().__init__("slow", pattern, times=None)
        self.pass_chunks = pass_chunks
        self.chunks = 0
        self.count_lock = threading.Lock()
        self.held, self.released = threading.Event(), threading.Event()

    @property
    def delay(self) -> float:
        with self.count_lock:
            self.chunks += 1
            hold = self.chunks > self.pass_chunks
        if hold:
            self.held.set()
            self.released.wait(EVENT_TIMEOUT_S)
        return 0.0

    @delay.setter
    def delay(self, value: float) -> None:  # Fault.__init__ sets one: the events replace it
        pass

    def release(self) -> None:
        self.released.set()

    def __repr__(self) -> str:  # the dataclass repr would read `delay`, i.e. wait
        return f"HeldTransfer({self.pattern!r}, pass_chunks={self.pass_chunks}, chunks={self.chunks})"


class Child:
    """`python -c FETCH_SCRIPT` with its output read by threads as it comes (no pipe fills up, a
    line is seen when it is written); with a name it touches <tmp>/<name>.ready once imported and
    waits for <tmp>/<name>.go."""

    def __init__(self, env, source: str, *patterns: str, name: str | None = None, awaited: str | None = None):
        e = dict(os.environ)
        if name is not None:
            e["READY_FILE"], e["GO_FILE"] = str(env.tmp / f"{name}.ready"), str(env.tmp / f"{name}.go")
            self.ready, self.go = env.tmp / f"{name}.ready", env.tmp / f"{name}.go"
        self.process = subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, MODEL_ID, source, *patterns], cwd=REPO,
                                        env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.awaited, self.seen = awaited, threading.Event()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if self.awaited is not None and self.awaited in line:
                self.seen.set()

    def finish(self, kill: bool = False) -> tuple[int, str, str]:
        if kill:
            self.process.kill()
        code = self.process.wait(EVENT_TIMEOUT_S)
        for reader in self.readers:
            reader.join(EVENT_TIMEOUT_S)
        return code, "".join(self.out), "".join(self.err)


def wait_until(condition, what: str) -> None:
    """Poll for an event another process makes visible (a file appearing)."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_processes_fetch_the_same_model_at_once(env):
    gate = env.hub.add_fault(HeldTransfer(VAE))  # the first fetch holds the VAE until the second waits
    patterns = ("transformer/*.safetensors", VAE)
    first = Child(env, "modelscope", *patterns, name="first")
    second = Child(env, "modelscope", *patterns, name="second", awaited="Another process is fetching")
    try:
        wait_until(lambda: first.ready.exists() and second.ready.exists(), "the imports")
        first.go.touch()
        assert gate.held.wait(EVENT_TIMEOUT_S), "the first fetch never started the VAE"  # it holds the lock
        second.go.touch()  # the second lists the model and finds the first still fetching it
        assert second.seen.wait(EVENT_TIMEOUT_S), "the second fetch did not wait for the first"
    except BaseException:
        for child in (first, second):
            child.finish(kill=True)
        raise
    finally:
        gate.release()
    results = [child.finish() for child in (first, second)]
    for code, out, err in results:
        assert code == 0, err
    outputs = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert outputs[0] == {"fetched": sorted([DIT1, DIT2, VAE, DIT_CONFIG, VAE_CONFIG]), "present": 0}
    assert outputs[1] == {"fetched": [], "present": 5}
    for path in (DIT1, DIT2, VAE):
        assert len(env.hub.file_requests(path)) == 1, f"{path} was downloaded more than once"
    assert assert_clean(env) == {DIT1, DIT2, VAE, DIT_CONFIG, VAE_CONFIG}


@pytest.mark.parametrize("source", SOURCES)
def test_an_interrupted_download_is_picked_up_by_a_later_run(env, source):
    from tests.support.hub_server import CHUNK

    gate = env.hub.add_fault(HeldTransfer(TE1, pass_chunks=(8 << 20) // CHUNK))  # 8 MB of 19.5, then hold
    child = Child(env, source, TE1)
    try:
        assert gate.held.wait(EVENT_TIMEOUT_S), "the download never got 8 MB in"
        if source == "modelscope":  # the client writes what it received into its staged partial file
            partial = f"{Path(TE1).name}.incomplete"
            wait_until(lambda: any(p.stat().st_size > 0 for p in (env.base / ".diffsynth" / "staging").rglob(partial)),
                       "bytes in the partial file")
    finally:
        code, _, err = child.finish(kill=True)  # as a power cut would: the transfer cannot have ended
        gate.release()
    assert code == -9, f"the fetch ended before it was killed: {err}"
    assert not (env.root / TE1).exists() and assert_clean(env) == set()

    env.hub.clear_faults()
    env.hub.clear_requests()
    assert resolve_files(config(TE1, download_source=source)) == [env.root / TE1]
    assert assert_clean(env) == {TE1, TE_CONFIG}
    if source == "modelscope":  # its partial file waited in the staging folder: only the rest is fetched
        assert env.hub.file_requests(TE1)[0].range_start > 0
    assert not any((env.base / ".diffsynth" / "staging").rglob("*.incomplete"))
