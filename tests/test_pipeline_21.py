"""QwenImage21Pipeline against diffusers' QwenImage21Pipeline on one tiny repo written by diffusers/transformers'
save_pretrained (tests/support/qwen21.py), loaded through our loader: text-to-image with and without guidance,
one picture, two pictures one of them RGBA, the KV cache on and off, a given sigmas grid, non-square sizes (max
difference <= 2/255 on all four channels); the API as the issue writes it (lists of shard files, the processor
folder); the schedule; LoRA cold / hot / clear against diffusers + peft; bad input refused before any weight loads."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import CheckpointError, ModelConfig, PictureError, QwenImage21Pipeline, QwenImagePipeline, SettingError
from pipelines.core import pipeline as core_pipeline
from pipelines.models.qwen_image_21_dit import QwenImage21DiT
from pipelines.qwen_image_2_1 import SCHEDULER
from tests.support.qwen21 import SCHEDULER as SCHEDULER_CONFIG
from tests.support.qwen21 import picture

diffusers = pytest.importorskip("diffusers")

PARTS = ("transformer", "text_encoder", "vae")


def ours_from(root, **kwargs) -> QwenImage21Pipeline:
    return QwenImage21Pipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=root / part) for part in PARTS],
        processor_config=ModelConfig(path=root / "processor"), **kwargs)


@pytest.fixture(scope="module")
def pipes(diffusers_21_repo):
    root, reference = diffusers_21_repo
    return ours_from(root), reference


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_image(ours: Image.Image, reference: Image.Image) -> None:
    """RGBA both, at most 2/255 apart on every channel, and the reference neither flat nor saturated."""
    assert ours.mode == reference.mode == "RGBA" and ours.size == reference.size
    a, b = pixels(ours), pixels(reference)
    assert np.abs(a - b).max() <= 2, f"max pixel difference {np.abs(a - b).max()}"
    assert ((b > 2) & (b < 253)).mean() > 0.5 and (b.std(axis=(0, 1)) > 5).all(), "degenerate reference image"


def run_both(pipes, prompt: str, seed: int = 5, negative_prompt: str | None = None, cfg_scale: float = 1.0,
             height: int | None = None, width: int | None = None, steps: int = 2, pictures=None,
             resolution: int = 64, use_kv_cache: bool = True, sigmas=None) -> tuple[Image.Image, Image.Image]:
    ours, reference = pipes
    got = ours(prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale, height=height, width=width, seed=seed,
               num_inference_steps=steps, edit_image=pictures, output_resolution=resolution,
               use_kv_cache=use_kv_cache, sigmas=sigmas, progress_bar=False)
    expected = reference(prompt=prompt, image=pictures, negative_prompt=negative_prompt, true_cfg_scale=cfg_scale,
                         height=height, width=width, num_inference_steps=steps, sigmas=sigmas,
                         generator=torch.Generator("cpu").manual_seed(seed), output_resolution=resolution,
                         use_kv_cache=use_kv_cache).images[0]
    return got, expected


# ---------------------------------------------------------------------------------------------- parity


CASES = {
    "text_to_image": dict(prompt="a red fox in fresh snow", height=64, width=96, steps=3),
    "guided": dict(prompt="a red fox in fresh snow", negative_prompt="blurry", cfg_scale=4.0, height=96, width=64),
    "one_picture": dict(prompt="make it winter", pictures=[picture(128, 64, seed=1)], resolution=96),  # 64x128 out
    "two_pictures_rgba": dict(prompt="the cat of picture 1 on the sofa of picture 2", negative_prompt="",
                              cfg_scale=3.0, pictures=[picture(64, 96, "RGBA", seed=2), picture(80, 48, seed=3)],
                              height=64, width=128),
    "sigmas": dict(prompt="a red fox in fresh snow", height=64, width=64, sigmas=[1.0, 0.75, 0.4]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_image_matches_diffusers(pipes, case):
    got, expected = run_both(pipes, **CASES[case])
    assert_same_image(got, expected)
    if case == "one_picture":
        assert got.size == (128, 64)  # the last picture's aspect at output_resolution^2
    if case == "sigmas":  # the grid replaced the 2 linear steps
        assert pipes[0].timings["denoise_steps"] == 3


def test_kv_cache_off_gives_the_same_image(pipes, monkeypatch):
    """Without the cache the prompt and picture tokens are computed at every step (with it, once per prompt): the
    image is the same, bit for bit, and diffusers' without its cache agrees. Both prompts go through the DiT
    together: one product per projection for their prefixes, one for their targets."""
    ours, _ = pipes
    args = dict(prompt="make it winter", negative_prompt="", cfg_scale=2.0, pictures=[picture(96, 64, "RGBA", seed=4)],
                steps=3)
    prefixes, products = [], []
    original = QwenImage21DiT._embed_prefix
    monkeypatch.setattr(QwenImage21DiT, "_embed_prefix", lambda *a: prefixes.append(1) or original(*a))
    hook = ours.dit.transformer_blocks[0].attn.to_q.register_forward_hook(lambda *_: products.append(1))
    try:
        cached = ours(args["prompt"], negative_prompt="", cfg_scale=2.0, edit_image=args["pictures"], seed=5,
                      num_inference_steps=3, output_resolution=64, progress_bar=False)
    finally:
        hook.remove()
    assert len(prefixes) == 2  # each prompt's prefix once: its first step fills its cache
    assert len(products) == 2 + 1 + 1  # both prefixes, then both targets; then both targets at each later step
    got, expected = run_both(pipes, **args, use_kv_cache=False)
    assert len(prefixes) == 2 + 2 * 3
    assert_same_image(got, expected)
    assert np.array_equal(pixels(cached), pixels(got))


def test_the_issue_api_with_local_files(diffusers_21_repo):
    """Exactly the call the issue writes, with local paths: lists of shard files and the processor folder."""
    root, reference = diffusers_21_repo
    files = {part: sorted((root / part).glob("*.safetensors")) for part in PARTS}
    assert len(files["transformer"]) > 1 and len(files["text_encoder"]) > 1
    pipe = QwenImage21Pipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=[str(f) for f in files["transformer"]]),
                       ModelConfig(path=files["text_encoder"]), ModelConfig(path=str(files["vae"][0]))],
        processor_config=ModelConfig(path=str(root / "processor")))
    pic1, pic2 = picture(64, 64, "RGBA", seed=6), picture(96, 64, seed=7)
    image = pipe("a capybara in a wizard hat", negative_prompt=None, cfg_scale=1.0, num_inference_steps=2, seed=0,
                 height=None, width=None, edit_image=[pic1, pic2], output_resolution=64, use_kv_cache=True,
                 sigmas=None, progress_bar=True)
    expected = reference(prompt="a capybara in a wizard hat", image=[pic1, pic2], num_inference_steps=2,
                         generator=torch.Generator("cpu").manual_seed(0), output_resolution=64).images[0]
    assert_same_image(image, expected)


def test_bfloat16_runs(diffusers_21_repo, pipes):
    """The issue's dtype: the same call in bfloat16 gives an RGBA image near the float32 one."""
    root, _ = diffusers_21_repo
    ours = pipes[0]
    pipe = QwenImage21Pipeline.from_pretrained(
        torch_dtype=torch.bfloat16, device="cpu", model_configs=[ModelConfig(path=root / part) for part in PARTS],
        processor_config=ModelConfig(path=root / "processor"))
    assert pipe.dit.dtype == torch.bfloat16
    args = dict(prompt="a red fox", edit_image=[picture(64, 64, "RGBA", seed=8)], output_resolution=64, seed=1,
                num_inference_steps=2, progress_bar=False)
    low, full = pixels(pipe(**args)), pixels(ours(**args))
    assert low.shape == full.shape == (64, 64, 4)
    assert np.abs(low - full).mean() < 8 and low.std() > 5


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("grid,tokens", [(None, 16), (None, 4096), (None, 9000), ([1.0, 0.75, 0.4], 64),
                                         ([0.97, 0.5, 0.2, 0.05], 2000)])
def test_sigmas_match_diffusers_scheduler(grid, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    steps = 7
    reference = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    reference.set_timesteps(sigmas=grid if grid is not None else np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = SCHEDULER.sigmas(steps, tokens) if grid is None else SCHEDULER.shift_grid(grid, tokens)
    assert SCHEDULER.mu(tokens) == pytest.approx(mu)
    torch.testing.assert_close(ours, reference.sigmas, atol=1e-6, rtol=0)


def test_scheduler_and_sigmas_combine(pipes):
    """A scheduler given with a grid shifts that grid (here with a terminal stretch), as diffusers' scheduler of
    that config does; the image follows the scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines import FlowMatchScheduler

    config = {**SCHEDULER_CONFIG, "base_shift": 0.8, "max_shift": 1.3, "shift_terminal": 0.1}
    ours = FlowMatchScheduler.from_config(config)
    reference = FlowMatchEulerDiscreteScheduler(**config)
    reference.set_timesteps(sigmas=[1.0, 0.7, 0.3], mu=ours.mu(64))
    torch.testing.assert_close(ours.shift_grid([1.0, 0.7, 0.3], 64), reference.sigmas, atol=1e-6, rtol=0)
    args = dict(prompt="a red fox", height=128, width=128, seed=2, sigmas=[1.0, 0.7, 0.3], progress_bar=False)
    assert not np.array_equal(pixels(pipes[0](**args)), pixels(pipes[0](**args, scheduler=ours)))


# ---------------------------------------------------------------------------------------------- LoRA


TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out", "img_in",
           "txt_in.in_layer", "txt_in.out_layer", "modulation.1", "norm_out.linear", "proj_out", "linear_1",
           "linear_2"]  # every linear layer of the 2.1 DiT, as peft target names


@pytest.fixture(scope="module")
def peft_lora(diffusers_21_repo, tmp_path_factory):
    """A LoRA made with peft on diffusers' 2.1 transformer (every linear layer, rank 4, lora_alpha 8, random
    non-zero A and B), written by diffusers' save_lora_weights: `transformer.<layer>.lora_A/B.weight`."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    _, reference = diffusers_21_repo
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(reference.transformer), config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    assert len(state) == 2 * 22  # 7 linear layers per block x 2 blocks + 8 outside them
    folder = tmp_path_factory.mktemp("lora_21")
    diffusers.QwenImage21Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                                    transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_cold_hot_and_clear_match_diffusers(diffusers_21_repo, peft_lora):
    root, reference = diffusers_21_repo
    theirs = diffusers.QwenImage21Pipeline(**{**reference.components,
                                              "transformer": copy.deepcopy(reference.transformer)})
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(peft_lora), adapter_name="tiny")
    pictures = [picture(96, 64, seed=9)]
    expected = {}
    for alpha in (0.5, 1.0):
        theirs.set_adapters(["tiny"], [alpha])
        expected[alpha] = theirs(prompt="a red fox", image=pictures, num_inference_steps=2, output_resolution=64,
                                 generator=torch.Generator("cpu").manual_seed(5)).images[0]
    ours = ours_from(root)  # a pipeline of its own: the module's stays without LoRA

    def generate():
        return ours("a red fox", edit_image=pictures, num_inference_steps=2, seed=5, output_resolution=64,
                    progress_bar=False)

    base = generate()
    assert np.abs(pixels(base) - pixels(expected[1.0])).mean() > 5  # the LoRA shows
    assert np.abs(pixels(expected[0.5]) - pixels(expected[1.0])).mean() > 2  # and so does its strength
    handle = ours.load_lora(ours.dit, ModelConfig(path=peft_lora), alpha=1.0)
    assert not handle.hot and len(handle.layers) == 22
    assert_same_image(generate(), expected[1.0])
    handle.set_alpha(0.5)
    assert_same_image(generate(), expected[0.5])
    ours.clear_lora()
    assert np.array_equal(pixels(generate()), pixels(base))
    handle = ours.load_lora(ours.dit, str(peft_lora), alpha=0.5, hotload=True)
    assert handle.hot
    assert_same_image(generate(), expected[0.5])
    ours.clear_lora()
    assert np.array_equal(pixels(generate()), pixels(base))


# ---------------------------------------------------------------------------------------------- bad input


def check(**arguments):
    return QwenImage21Pipeline.check_arguments({"prompt": "a cat", **arguments})


@pytest.mark.parametrize("arguments,match", [
    (dict(sigmas=[1.0, 0.5, 0.6]), r"sigmas must decrease at every step: sigmas\[1\]=0.5 is followed by 0.6"),
    (dict(sigmas=[1.0, float("nan")]), r"sigmas\[1\]=nan: a finite number"),
    (dict(sigmas=[1.0, 0.5, 0.0]), r"sigmas\[2\]=0.0: every sigma lies in \(0, 1\].*leave it out"),
    (dict(sigmas=[]), "sigmas must be a non-empty list"),
    (dict(sigmas="1, 0.5"), "sigmas must be a non-empty list"),
    (dict(cfg_scale=float("inf")), "cfg_scale=inf: a finite number"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1"),
    (dict(output_resolution=0), "output_resolution must be an integer from 1"),
    (dict(height=16), "height must be an integer of at least 32"),
    (dict(height=8192, width=8192), "above max_pixels"),
    (dict(use_kv_cache="false"), "use_kv_cache must be true or false"),
    (dict(negative_prompt=3), "negative_prompt must be a string or None"),
    (dict(scheduler="lightning"), "scheduler must be a FlowMatchScheduler"),
    (dict(edit_image=[]), "edit_image must be a picture, a path, or a non-empty list"),
    (dict(edit_image=[picture(4000, 40)], output_resolution=64),
     r"edit_image\[0\] \(4000x40\) at output_resolution=64 would be 640x0 pixels"),
    (dict(steps=3), "takes no argument 'steps'"),
])
def test_bad_arguments_are_refused_without_a_model(arguments, match):
    with pytest.raises(SettingError, match=match):
        check(**arguments)


def test_pictures_are_read_when_checked(tmp_path):
    """Paths and pictures, RGB or RGBA: read by the library's one reader before any model; an unreadable file is
    named with its place in the list."""
    rgba, rgb = picture(64, 32, "RGBA", seed=1), picture(48, 96, seed=2)
    rgba.save(tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("not a picture")
    a = check(edit_image=[tmp_path / "a.png", rgb], output_resolution=64)
    assert [p.mode for p in a["edit_image"]] == ["RGBA", "RGB"]
    assert (a["height"], a["width"]) == (96, 32)  # the last picture's aspect, rounded down to multiples of 32
    assert np.array_equal(np.asarray(a["edit_image"][0]), np.asarray(rgba))
    with pytest.raises(PictureError, match=r"edit_image\[1\]: .*notes.png' is not a readable image"):
        check(edit_image=[rgb, str(tmp_path / "notes.png")])
    a = check(height=100, width=1000)  # multiples of 32, rounded down as diffusers does
    assert (a["height"], a["width"], a["sigmas"], a["output_resolution"]) == (96, 992, None, 1024)
    assert check(sigmas=np.array([1.0, 0.5]))["sigmas"] == (1.0, 0.5)


def test_more_than_ten_pictures_warn(pipes, caplog):
    ours, _ = pipes
    with caplog.at_level(logging.WARNING, logger="pipelines.qwen_image_2_1"):
        image = ours("eleven", edit_image=[picture(32, 32, seed=i) for i in range(11)], output_resolution=32,
                     num_inference_steps=1, seed=0, progress_bar=False)
    assert image.size == (32, 32) and "11 pictures: Qwen-Image 2.1 was trained with up to 10" in caplog.text


def test_a_picture_size_the_processor_would_change_is_refused(pipes):
    ours, _ = pipes  # its processor keeps pictures between 1,024 and 65,536 pixels
    with pytest.raises(SettingError, match=r"edit_image\[0\] is resized to 320x320 \(output_resolution=320\), but "
                                           r"the processor reads pictures at 256x256"):
        ours("a cat", edit_image=[picture(64, 64)], output_resolution=320, num_inference_steps=1, progress_bar=False)


def test_guidance_needs_a_negative_prompt(pipes, caplog):
    """As in diffusers: cfg_scale > 1 without a negative prompt runs unguided (with a warning)."""
    ours, _ = pipes
    args = dict(prompt="a red fox", height=64, width=64, seed=3, num_inference_steps=2, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="pipelines.qwen_image_2_1"):
        unguided = ours(**args, cfg_scale=4.0)
    assert "no negative_prompt: guidance is off" in caplog.text
    assert np.array_equal(pixels(unguided), pixels(ours(**args)))
    assert not np.array_equal(pixels(unguided), pixels(ours(**args, cfg_scale=4.0, negative_prompt="")))


def test_foreign_parts_and_bad_small_files_are_refused_before_any_weight_loads(diffusers_21_repo, tiny_repo,
                                                                               monkeypatch):
    """A 1.x part given to the 2.1 pipeline (and a 2.1 part to the 1.x one) is named as such, beside the parts
    given, from the files' headers; a part given twice, a tokenizer the pipeline does not take, a processor folder
    that is not one: all refused before any weight is read."""
    root, _ = diffusers_21_repo
    loads = []
    original = core_pipeline.load_model
    monkeypatch.setattr(core_pipeline, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    with pytest.raises(CheckpointError, match=(
            r"path=.*Qwen-Image-Tiny/vae'\) holds the Qwen-Image 1.x VAE \(QwenImageVAE\), but QwenImage21Pipeline "
            r"loads Qwen-Image 2.1 models \(given: the dit \(QwenImage21DiT, path=.*transformer'\)\).*Give the "
            r"Qwen-Image 2.1 VAE instead, or load Qwen-Image 1.x models with QwenImagePipeline")):
        QwenImage21Pipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                            model_configs=[ModelConfig(path=root / "transformer"),
                                                           ModelConfig(path=tiny_repo / "vae")])
    with pytest.raises(CheckpointError, match=r"holds the Qwen-Image 2.1 text encoder \(QwenImage21TextEncoder\), "
                                              r"but QwenImagePipeline loads Qwen-Image 1.x models"):
        QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=tiny_repo / "transformer"),
                                                         ModelConfig(path=root / "text_encoder")])
    assert loads == []
    with pytest.raises(ValueError, match="Two model configs hold the vae"):
        QwenImage21Pipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                            model_configs=[ModelConfig(path=root / "vae")] * 2)
    with pytest.raises(ValueError, match="QwenImage21Pipeline takes no tokenizer_config"):  # processor/ has it
        QwenImage21Pipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                            model_configs=[ModelConfig(path=root / "vae")],
                                            tokenizer_config=ModelConfig(path=root / "processor"))
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        QwenImage21Pipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                            model_configs=[ModelConfig(path=root / "vae")],
                                            processor_config=ModelConfig(path=root / "transformer"))
    assert loads == []


def test_missing_processor_is_named(diffusers_21_repo):
    root, _ = diffusers_21_repo
    pipe = QwenImage21Pipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                               model_configs=[ModelConfig(path=root / part) for part in PARTS])
    with pytest.raises(RuntimeError, match="The pipeline has no processor.*processor_config=..."):
        pipe("a cat", height=64, width=64, num_inference_steps=1)


def test_the_demo_repo_is_read_by_diffusers_as_by_us(tiny_21_repo):
    """The tiny demo repo (pipelines.demo.qwen_image_21_tiny) is a real hub layout: diffusers and transformers load
    its parts from their config.json files, and their pipeline gives our demo pipeline's image."""
    from transformers import Qwen3VLForConditionalGeneration

    from pipelines.demo.qwen_image_21_tiny import TinyQwenImage21Pipeline
    from tests.support.qwen21 import qwen3_vl_processor

    root = tiny_21_repo
    reference = diffusers.QwenImage21Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=diffusers.AutoencoderKLQwenImage21.from_pretrained(root / "vae"),
        text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=torch.float32),
        processor=qwen3_vl_processor(root / "processor", {"size": {"shortest_edge": 1024, "longest_edge": 16777216}}),
        transformer=diffusers.QwenImage21Transformer2DModel.from_pretrained(root / "transformer"))
    reference.set_progress_bar_config(disable=True)
    ours = TinyQwenImage21Pipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=root / part) for part in PARTS],
        processor_config=ModelConfig(path=root / "processor"))
    pictures = [picture(96, 64, "RGBA", seed=12)]
    image = ours("a red fox", edit_image=pictures, num_inference_steps=2, seed=4, progress_bar=False)
    assert image.size == (160, 96)  # the last picture's aspect at the demo's 128x128 area
    expected = reference(prompt="a red fox", image=pictures, num_inference_steps=2, output_resolution=128,
                         generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert_same_image(image, expected)
