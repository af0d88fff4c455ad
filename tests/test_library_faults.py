"""What a user can get wrong with the library, and what goes wrong at run time, ends in an error
that says what, where and how to fix it, before any work where it can be seen before: never a
black image, never a silently different one."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import FlowMatchScheduler, LoraError, ModelConfig, NonFiniteError, QwenImagePipeline, SettingError
from pipelines.demo.checkpoints import random_state_dict, save_sharded, write_json
from pipelines.demo.lora import lora_state_dict, random_lora
from pipelines.demo.qwen_image_tiny import text_encoder_config
from pipelines.models.qwen2_5_text import QwenImageTextEncoder, QwenTextEncoderParams

ARGS = dict(prompt="a red fox", seed=1, height=64, width=64, num_inference_steps=3, progress_bar=False)


@pytest.fixture(scope="module")
def pipe(tiny_repo):
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=tiny_repo / f) for f in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=tiny_repo / "tokenizer"))


@pytest.mark.parametrize("override,needle", [
    (dict(cfg_scale=math.nan), "cfg_scale=nan"),
    (dict(cfg_scale=math.inf), "cfg_scale=inf"),
    (dict(denoising_strength=math.nan), "denoising_strength=nan"),
    (dict(exponential_shift_mu=math.nan), "exponential_shift_mu=nan"),
    (dict(seed=-1), "outside [0, 2**64)"),
    (dict(seed=2**64), "outside [0, 2**64)"),
    (dict(height=100000, width=100000), "max_pixels"),
    (dict(height=0), "height must be a positive integer"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(tile_size=8, tile_stride=16), "tile_stride"),
    (dict(input_image="/no/such/picture.png"), "no such file"),
    (dict(edit_image=[]), "edit_image"),
    # values that passed the checks and failed only after loading (21.5)
    (dict(exponential_shift_mu=1e6), "exponential_shift_mu=1000000.0 gives no usable sigma schedule"),
    (dict(exponential_shift_mu=-1e6), "exponential_shift_mu=-1000000.0 gives no usable sigma schedule"),
    (dict(rand_device="bogus"), "rand_device='bogus' is not a device"),
    (dict(rand_device="cuda:7"), "rand_device='cuda:7'"),
    (dict(num_inference_steps=10**6), "num_inference_steps must be an integer from 1 to 10000"),
    (dict(tiled="false"), "tiled must be true or false"),
    (dict(cfg_batch=1), "cfg_batch must be true or false"),
    (dict(zero_cond_t="yes"), "zero_cond_t must be true, false or None"),
    (dict(scheduler="lightning"), "scheduler must be a FlowMatchScheduler"),
    (dict(input_image=3), "input_image must be a PIL.Image or the path"),
])
def test_bad_call_arguments_are_refused_before_any_work(pipe, override, needle, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append(a))
    with pytest.raises((SettingError, FileNotFoundError, ValueError), match=needle.replace("[", r"\[").replace(
            "*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        pipe(**{**ARGS, **override})
    assert not calls  # refused before the text encoder ran


def test_the_argument_checks_need_no_model():
    """What the runner calls before loading: the same refusals without a pipeline."""
    with pytest.raises(SettingError, match="exponential_shift_mu=1000000.0"):
        QwenImagePipeline.check_arguments(dict(prompt="p", exponential_shift_mu=1e6))
    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="rand_device='cuda' but CUDA is not available"):
            QwenImagePipeline.check_arguments(dict(prompt="p", rand_device="cuda"))
    checked = QwenImagePipeline.check_arguments(dict(prompt="p", exponential_shift_mu=1.1, rand_device="cpu"))
    assert checked["exponential_shift_mu"] == 1.1 and checked["rand_device"] == torch.device("cpu")


def test_an_unreadable_picture_names_the_file(pipe, tmp_path):
    bad = tmp_path / "not_a_picture.png"
    bad.write_bytes(b"this is text")
    with pytest.raises(ValueError, match=r"not_a_picture\.png.*not a readable image"):
        pipe(**ARGS, input_image=str(bad), denoising_strength=0.5)


def test_latents_that_become_non_finite_stop_the_call_naming_the_step(pipe, monkeypatch):
    forward, calls = pipe.dit.forward, []

    def broken(*args, **kwargs):  # as an fp16 overflow in the second step would
        calls.append(1)
        out = forward(*args, **kwargs)
        return out * math.nan if len(calls) == 3 else out  # step 2's conditional branch (CFG: 2 per step)

    monkeypatch.setattr(pipe.dit, "forward", broken)
    decoded = []
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: decoded.append(a))
    with pytest.raises(NonFiniteError, match="step 2 of 3"):
        pipe(**ARGS, negative_prompt="blurry")
    assert not decoded  # nothing decoded into a black image


def test_non_finite_values_in_a_lora_are_refused_naming_the_layer(pipe):
    shapes = {k: tuple(v.shape) for k, v in pipe.dit.state_dict().items()}
    state = lora_state_dict(random_lora(shapes, rank=2, seed=0), "diffusers")
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = math.inf
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    with pytest.raises(LoraError, match=rf"{key.replace('.', '[.]')}.*NaN or infinite"):
        pipe.load_lora(pipe.dit, state)
    assert all(torch.equal(v, before[k]) for k, v in pipe.dit.state_dict().items())  # nothing applied
    with pytest.raises(SettingError, match="alpha=nan"):
        pipe.load_lora(pipe.dit, lora_state_dict(random_lora(shapes, rank=2, seed=1), "diffusers"), alpha=math.nan)
    handle = pipe.load_lora(pipe.dit, lora_state_dict(random_lora(shapes, rank=2, seed=2), "diffusers"), alpha=0.5)
    with pytest.raises(SettingError, match="alpha=inf"):
        handle.set_alpha(math.inf)
    assert handle.alpha == 0.5
    pipe.clear_lora()


def test_non_finite_schedules_and_vram_limits_are_refused(tiny_repo):
    with pytest.raises(SettingError, match="FlowMatchScheduler.base_shift=nan"):
        FlowMatchScheduler(base_shift=math.nan)
    for limit in (math.nan, math.inf):
        with pytest.raises(SettingError, match="vram_limit"):
            QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", vram_limit=limit,
                                              model_configs=[ModelConfig(path=tiny_repo / "vae", offload_device="cpu")])


@pytest.mark.parametrize("device,needle", [("cuda", "CUDA is not available"), ("mps", "MPS is not available"),
                                           ("gpu", "is not a device")])
def test_unavailable_devices_are_named_before_loading(tiny_repo, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SettingError, match=needle):
        QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device=device,
                                          model_configs=[ModelConfig(path=tiny_repo / "vae")])


def test_components_of_different_models_are_an_error_at_load(tiny_repo, tmp_path):
    """A text encoder whose hidden size is not the DiT's text width: refused at load, naming both."""
    other = QwenTextEncoderParams(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=24, mrope_section=[3, 4, 5], max_window_layers=1)
    from pipelines.core.loader import parameters_on_meta

    with parameters_on_meta():
        shapes = {k: tuple(v.shape) for k, v in QwenImageTextEncoder(other).state_dict().items()}
    save_sharded(random_state_dict(shapes, seed=0), tmp_path / "text_encoder", "model", 1)
    write_json(tmp_path / "text_encoder" / "config.json", text_encoder_config(other))
    with pytest.raises(ValueError, match=r"hidden size is 48.*joint_attention_dim.*different models"):
        QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=tiny_repo / "transformer"), ModelConfig(path=tmp_path / "text_encoder")])


def test_an_edit_needs_a_processor_and_the_vision_tower(pipe):
    picture = Image.fromarray(np.full((48, 64, 3), 120, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="processor"):
        pipe(**ARGS, edit_image=[picture])


FIFO_CASES = r"""
import json, sys
from pathlib import Path
import torch
from pipelines import ModelConfig, QwenImagePipeline
from pipelines.core.lora import read_lora

root = Path(sys.argv[1])
cases = {
    "shard in a folder": lambda: QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=root / "shard")]),
    "shard by path": lambda: QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=sorted((root / "shard").glob("*.safetensors")))]),
    "shard index": lambda: QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=root / "index")]),
    "config.json": lambda: QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=root / "config")]),
    "lora": lambda: read_lora(root / "lora.safetensors"),
    "tokenizer": lambda: QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=ModelConfig(path=root / "tokenizer")),
    "processor": lambda: QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", processor_config=ModelConfig(path=root / "processor")),
}
for name, case in cases.items():
    try:
        case()
        print(json.dumps([name, None, "loaded"]), flush=True)
    except Exception as error:
        print(json.dumps([name, type(error).__name__, str(error)]), flush=True)
"""


def test_fifos_as_model_lora_tokenizer_and_processor_files_are_refused_not_waited_on(tiny_repo, tmp_path):
    """Each FIFO would block its reader forever (a shard inside safetensors, deaf to SIGINT and
    SIGTERM). The cases run in a child process that is killed after a timeout, so a missing
    refusal fails the test instead of hanging it."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from .processes import REPO, runner_env

    def fifo_instead_of(path):
        path.unlink()
        os.mkfifo(path)
        return path

    for case in ("shard", "index", "config"):
        shutil.copytree(tiny_repo / "transformer", tmp_path / case)
    fifos = {"shard in a folder": fifo_instead_of(sorted((tmp_path / "shard").glob("*.safetensors"))[1]),
             "shard index": fifo_instead_of(tmp_path / "index" / "diffusion_pytorch_model.safetensors.index.json"),
             "config.json": fifo_instead_of(tmp_path / "config" / "config.json")}
    fifos["shard by path"] = fifos["shard in a folder"]
    fifos["lora"] = tmp_path / "lora.safetensors"
    os.mkfifo(fifos["lora"])
    shutil.copytree(tiny_repo / "tokenizer", tmp_path / "tokenizer")
    fifos["tokenizer"] = fifo_instead_of(tmp_path / "tokenizer" / "tokenizer.json")
    shutil.copytree(tiny_repo / "tokenizer", tmp_path / "processor")
    fifos["processor"] = tmp_path / "processor" / "preprocessor_config.json"
    os.mkfifo(fifos["processor"])
    try:
        proc = subprocess.run([sys.executable, "-c", FIFO_CASES, str(tmp_path)], cwd=REPO, capture_output=True,
                              text=True, timeout=180, env=runner_env(tmp_path / "models"))
    except subprocess.TimeoutExpired as expired:  # the child is killed: a reader waited on a FIFO
        pytest.fail(f"a FIFO was opened and waited on; cases done: {expired.stdout}")
    results = {name: (kind, message) for name, kind, message in map(json.loads, proc.stdout.splitlines())}
    assert set(results) == set(fifos), proc.stderr[-3000:]
    for name, fifo in fifos.items():
        kind, message = results[name]
        assert kind in ("CheckpointError", "SettingError"), (name, kind, message)
        assert str(fifo) in message and "FIFO (named pipe)" in message and "not opened" in message, (name, message)
