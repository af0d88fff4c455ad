"""Qwen-Image-Edit (original, 2509, 2511) against diffusers on tiny checkpoints diffusers and
transformers write themselves.

The oracle for the pictures' prompt embeddings is transformers' Qwen2.5-VL with its own
processor (3-D M-RoPE positions from `mm_token_type_ids`). diffusers' edit pipelines call the
text encoder without `mm_token_type_ids`, which transformers 5.x needs for those positions: they
quietly fall back to 1-D positions from the first picture on (measured differences of the size of
the embeddings themselves). So the image parity below hands diffusers the oracle's embeddings
(`prompt_embeds=`), and everything after the text encoder (picture sizes, VAE latents, the
joint sequence, RoPE over several pictures, zero_cond_t, CFG, schedule, decode) is diffusers'.

The pictures' areas (~384x384 for the vision-language encoder, ~1024x1024 for the VAE) are
shrunk to 96x96 and 128x128 in both pipelines for speed, except in the original Edit's test,
whose diffusers pipeline hard-codes 1024x1024.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.qwen_image as qwen_image
from pipelines import ModelConfig, QwenImagePipeline
from pipelines.demo.processor import build_processor_folder

from .test_pipeline import PROMPT, assert_same_image

NEGATIVE = " "
EDIT = "Put the fox on the red cushion from the second picture"


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth picture (random pixels would make the VAE latents noise-dominated)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * y * rng.uniform(0.5, 2))
                for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


@pytest.fixture(scope="module")
def repo(diffusers_repo, tmp_path_factory):
    """(root of the 2509-like repo, root of the 2511-like repo, diffusers reference pipe): the
    same tiny weights, the second transformer saved with zero_cond_t=True."""
    from diffusers import QwenImageTransformer2DModel

    root, reference = diffusers_repo
    build_processor_folder(root / "processor")
    config = {k: v for k, v in reference.transformer.config.items() if not k.startswith("_")}
    zero = QwenImageTransformer2DModel(**{**config, "zero_cond_t": True})
    assert zero.zero_cond_t
    zero.load_state_dict(reference.transformer.state_dict())
    root_2511 = tmp_path_factory.mktemp("edit_2511")
    zero.eval().save_pretrained(root_2511 / "transformer")
    return root, root_2511, reference, zero


def ours(root, transformer_root=None) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=(transformer_root or root) / "transformer"),
                       ModelConfig(path=root / "text_encoder"), ModelConfig(path=root / "vae")],
        processor_config=ModelConfig(path=root / "processor"))


@pytest.fixture(scope="module")
def pipes(repo):
    root, root_2511, _, _ = repo
    return ours(root), ours(root, root_2511)


def test_the_picture_areas_are_diffusers_own():
    """Our areas equal diffusers' before any test shrinks both (a changed constant of ours would
    otherwise pass every parity test, which patch both sides to the same small areas)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    assert QwenImagePipeline.condition_area == qwen_image.CONDITION_AREA == plus.CONDITION_IMAGE_SIZE == 384 * 384
    assert QwenImagePipeline.reference_area == qwen_image.REFERENCE_AREA == plus.VAE_IMAGE_SIZE == 1024 * 1024
    assert QwenImagePipeline.output_area == qwen_image.OUTPUT_AREA == 1024 * 1024  # diffusers: inline 1024 * 1024


@pytest.fixture()
def small_areas(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    test_the_picture_areas_are_diffusers_own()  # what is patched below is the same on both sides
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 96 * 96)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 128 * 128)
    monkeypatch.setattr(QwenImagePipeline, "condition_area", 96 * 96)
    monkeypatch.setattr(QwenImagePipeline, "reference_area", 128 * 128)


def oracle_embeddings(reference, processor_dir, text: str, images: list[Image.Image], monkeypatch) -> torch.Tensor:
    """transformers' processor and Qwen2.5-VL, with the 3-D positions, the template's 64 system
    tokens dropped, as diffusers' _get_qwen_prompt_embeds would with transformers 4.x."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(processor_dir),
                                 tokenizer=AutoTokenizer.from_pretrained(processor_dir), video_processor=None)
    inputs = processor(text=[text], images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = reference.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                     mm_token_type_ids=inputs["mm_token_type_ids"], output_hidden_states=True)
    return out.hidden_states[-1][:, 64:]


def plus_embeddings(reference, processor_dir, prompt: str, images: list[Image.Image], monkeypatch) -> torch.Tensor:
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    template = QwenImageEditPlusPipeline(None, None, None, None, None, None)
    numbered = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
    seen = [template.image_processor.resize(im, *reversed(plus.calculate_dimensions(
        plus.CONDITION_IMAGE_SIZE, im.width / im.height))) for im in images]
    return oracle_embeddings(reference, processor_dir, template.prompt_template_encode.format(numbered + prompt), seen,
                             monkeypatch)


def edit_plus(reference, transformer, processor_dir, images, prompt, cfg, monkeypatch, **kwargs) -> Image.Image:
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(scheduler=reference.scheduler, vae=reference.vae,
                                     text_encoder=reference.text_encoder, tokenizer=reference.tokenizer,
                                     processor=None, transformer=transformer)
    embeds = plus_embeddings(reference, processor_dir, prompt, images, monkeypatch)
    negative = plus_embeddings(reference, processor_dir, NEGATIVE, images, monkeypatch) if cfg > 1 else None
    return pipe(image=images, prompt_embeds=embeds, negative_prompt_embeds=negative, true_cfg_scale=cfg,
                **kwargs).images[0]


# ------------------------------------------------------------------ prompt embeddings


@pytest.mark.parametrize("count", [1, 2])
def test_prompt_embeddings_with_pictures_equal_transformers(pipes, repo, small_areas, count, monkeypatch):
    root, _, reference, _ = repo
    images = [picture(80, 56, seed=i) for i in range(count)]
    hidden, mask = pipes[0].encode_prompt(EDIT, qwen_image.edit_input(images))
    expected = plus_embeddings(reference, root / "processor", EDIT, images, monkeypatch)
    assert mask is None and hidden.shape == expected.shape
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ images


@pytest.mark.parametrize("model,count,cfg,size", [
    ("2509", 2, 4.0, (64, 96)),
    ("2509", 1, 1.0, (80, 64)),
    ("2511", 1, 4.0, (96, 64)),
    ("2511", 2, 1.0, None),  # the size from the last picture: ~1024x1024 with its aspect
])
def test_edit_plus_matches_diffusers(pipes, repo, small_areas, model, count, cfg, size, monkeypatch):
    root, _, reference, zero = repo
    pipe = pipes[0] if model == "2509" else pipes[1]
    transformer = reference.transformer if model == "2509" else zero
    images = [picture(96, 64, seed=3), picture(56, 88, seed=4)][:count]
    sizes = {} if size is None else dict(height=size[0], width=size[1])
    image = pipe(EDIT, negative_prompt=NEGATIVE, edit_image=images, cfg_scale=cfg, seed=5, num_inference_steps=3,
                 progress_bar=False, **sizes)
    expected = edit_plus(reference, transformer, root / "processor", images, EDIT, cfg, monkeypatch,
                         num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5), **sizes)
    assert image.size == expected.size
    if size is None:
        assert image.size == (832, 1280) == qwen_image.fit_area(images[-1], 1024 * 1024)
    assert_same_image(image, expected)


def test_zero_cond_t_comes_from_the_config_and_an_explicit_value_wins(pipes, small_areas):
    plain, zero = pipes
    assert not plain.dit.params.zero_cond_t and zero.dit.params.zero_cond_t
    args = dict(prompt=EDIT, edit_image=[picture(96, 64, seed=3)], cfg_scale=1.0, seed=2, num_inference_steps=2,
                height=64, width=64, progress_bar=False)
    as_2509 = np.asarray(plain(**args))
    assert np.array_equal(np.asarray(zero(**args, zero_cond_t=False)), as_2509)  # same weights, flag off
    assert np.array_equal(np.asarray(plain(**args, zero_cond_t=True)), np.asarray(zero(**args)))
    assert np.abs(np.asarray(zero(**args), dtype=np.int16) - as_2509).mean() > 1  # the flag matters


def test_original_edit_with_one_picture_matches_diffusers(pipes, repo, monkeypatch):
    from diffusers import QwenImageEditPipeline

    root, _, reference, _ = repo
    source = picture(72, 56, seed=7)
    image = pipes[0](EDIT, negative_prompt=NEGATIVE, edit_image=source, cfg_scale=4.0, seed=1, height=64, width=80,
                     num_inference_steps=2, progress_bar=False)
    template = QwenImageEditPipeline(None, None, None, None, None, None)
    width, height, _ = __import__("diffusers").pipelines.qwenimage.pipeline_qwenimage_edit.calculate_dimensions(
        1024 * 1024, source.width / source.height)
    seen = template.image_processor.resize(source, height, width)
    embeds = [oracle_embeddings(reference, root / "processor", template.prompt_template_encode.format(p), [seen],
                                monkeypatch) for p in (EDIT, NEGATIVE)]
    pipe = QwenImageEditPipeline(scheduler=reference.scheduler, vae=reference.vae, text_encoder=reference.text_encoder,
                                 tokenizer=reference.tokenizer, processor=None, transformer=reference.transformer)
    expected = pipe(image=source, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], true_cfg_scale=4.0,
                    height=64, width=80, num_inference_steps=2,
                    generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert_same_image(image, expected)


def test_pictures_as_paths_and_text_to_image_with_the_edit_model(pipes, small_areas, tmp_path):
    pipe = pipes[1]
    path = tmp_path / "in.png"
    source = picture(96, 64, seed=3)
    source.save(path)
    args = dict(prompt=EDIT, cfg_scale=1.0, seed=2, num_inference_steps=2, height=64, width=64, progress_bar=False)
    assert np.array_equal(np.asarray(pipe(**args, edit_image=[str(path)])), np.asarray(pipe(**args,
                                                                                            edit_image=[source])))
    plain = pipe(PROMPT, seed=2, num_inference_steps=2, height=64, width=64, progress_bar=False)  # no pictures: t2i
    assert plain.size == (64, 64)
    with pytest.raises(FileNotFoundError, match="no such file"):
        pipe(**args, edit_image=[str(tmp_path / "missing.png")])


def test_editing_needs_a_processor(diffusers_repo):
    root, _ = diffusers_repo
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=root / "transformer"), ModelConfig(path=root / "text_encoder"),
                       ModelConfig(path=root / "vae")], tokenizer_config=ModelConfig(path=root / "tokenizer"))
    with pytest.raises(RuntimeError, match="processor"):
        pipe(EDIT, edit_image=[picture(64, 64, seed=0)], num_inference_steps=1, height=64, width=64)


# ------------------------------------------------------------------ VRAM management and LoRA on edit models

FP8 = "float8_e4m3fn"
EDIT_VRAM = {  # conf/vram presets on a CPU run (auto = float32 / cpu)
    "cpu_offload": (dict(offload_dtype="float32", offload_device="cpu"), None),
    "disk_float32": (dict(offload_device="disk", onload_device="disk"), 0.0),
    "fp8": (dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, preparing_dtype=FP8), None),
}


def tiny_edit(root, keys: dict | None = None, vram_limit=None) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", vram_limit=vram_limit,
        model_configs=[ModelConfig(path=root / folder, **(keys or {})) for folder in ("transformer", "text_encoder",
                                                                                      "vae")],
        processor_config=ModelConfig(path=root / "processor"))


EDIT_ARGS = dict(prompt=EDIT, negative_prompt=NEGATIVE, cfg_scale=4.0, seed=4, num_inference_steps=2, height=64,
                 width=48, edit_image_auto_resize=False, progress_bar=False)


@pytest.fixture(scope="module")
def edit_pictures():
    return [picture(64, 48, seed=11), picture(48, 64, seed=12)]


@pytest.fixture(scope="module")
def unmanaged_edit(tiny_edit_repo, edit_pictures):
    pipe = tiny_edit(tiny_edit_repo)
    return pipe, np.asarray(pipe(**EDIT_ARGS, edit_image=edit_pictures), dtype=np.int16)


@pytest.mark.parametrize("preset", list(EDIT_VRAM))
def test_vram_management_covers_the_vision_tower(preset, tiny_edit_repo, edit_pictures, unmanaged_edit):
    keys, limit = EDIT_VRAM[preset]
    pipe = tiny_edit(tiny_edit_repo, keys, vram_limit=limit)
    manager = pipe.vram["text_encoder"]
    vision = [layer for layer in manager.layers if layer.name.startswith("visual.")]
    assert vision and any(layer.name.startswith("visual.patch_embed") for layer in vision)
    image = np.asarray(pipe(**EDIT_ARGS, edit_image=edit_pictures), dtype=np.int16)
    _, reference = unmanaged_edit
    diff = np.abs(image - reference)
    if preset == "fp8":  # float8 storage of every matrix, the vision tower's included
        assert diff.mean() < 8 and (image != reference).any()
    else:  # the same kernels on the same values
        assert diff.max() == 0
    assert all(layer.state == 0 for layer in manager.layers)  # offloaded at the end of the call
    if limit == 0.0:  # nothing stays prepared, the vision tower included: every forward read from the file
        assert manager.stats()["prepared_layers"] == 0


def test_vram_limit_bounds_the_prepared_vision_layers(tiny_edit_repo, edit_pictures):
    keys = dict(offload_dtype="float32", offload_device="cpu", onload_dtype="bfloat16", preparing_dtype="float32")
    encoder = tiny_edit(tiny_edit_repo).text_encoder
    embedding = encoder.model.embed_tokens.weight.numel() * 4  # the tiny model's bytes are mostly its vocabulary
    rest = sum(p.numel() * 4 for p in encoder.parameters()) - embedding
    limit = (embedding + rest / 2) / 2**30  # the embedding runs first, then layers until the limit
    pipe = tiny_edit(tiny_edit_repo, keys, vram_limit=limit)
    manager = pipe.vram["text_encoder"]
    seen = {}

    def record(*args):
        seen.update(prepared=[layer for layer in manager.layers if layer.state == 2])

    pipe.text_encoder.register_forward_hook(lambda *args: record())
    pipe(**EDIT_ARGS, edit_image=edit_pictures)
    prepared = seen["prepared"]
    assert 0 < len(prepared) < len(manager.layers)
    assert any(layer.name.startswith("visual.") for layer in prepared)  # the vision tower counts against the limit
    assert sum(layer.nbytes[2] for layer in prepared) <= limit * 2**30


def test_lora_cold_hot_and_clear_on_the_edit_dit(tiny_edit_repo, edit_pictures, unmanaged_edit, tmp_path):
    from pipelines.demo.lora import random_lora, save_lora

    pipe, base = unmanaged_edit
    shapes = {k: tuple(v.shape) for k, v in pipe.dit.state_dict().items()}
    path = save_lora(tmp_path / "edit_lora.safetensors", random_lora(shapes, rank=4, seed=9), "diffusers")
    args = dict(EDIT_ARGS, edit_image=edit_pictures)
    pipe.load_lora(pipe.dit, str(path), alpha=0.8)
    cold = np.asarray(pipe(**args), dtype=np.int16)
    pipe.clear_lora()
    assert np.array_equal(np.asarray(pipe(**args), dtype=np.int16), base)
    pipe.load_lora(pipe.dit, str(path), alpha=0.8, hotload=True)
    hot = np.asarray(pipe(**args), dtype=np.int16)
    pipe.clear_lora()
    assert np.abs(cold - base).mean() > 2  # the LoRA shows
    assert np.abs(hot - cold).max() <= 2  # fused or added in the forward: the same update
    assert np.array_equal(np.asarray(pipe(**args), dtype=np.int16), base)


def test_the_readme_edit_demo_names_shipped_pictures_and_encodes_them_small(tiny_edit_repo):
    """The README's edit-demo line works in a fresh clone: its pictures ship with the repository,
    and the preset's pipeline (conf/model/qwen_image_edit_tiny.yaml) encodes them at the tiny
    model's small areas: the DiT sees 60 tokens a picture, not ~4096 (~1024x1024)."""
    import importlib
    import re

    import yaml

    from .processes import REPO

    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "model=qwen_image_edit_tiny" in x)
    pictures = [REPO / p for p in re.search(r"call\.edit_image=\[([^\]]*)\]", line).group(1).split(",")]
    assert len(pictures) == 2 and all(p.is_file() for p in pictures), pictures
    preset = yaml.safe_load((REPO / "conf" / "model" / "qwen_image_edit_tiny.yaml").read_text())
    module, _, name = preset["pipeline"].rpartition(".")
    cls = importlib.import_module(module).__dict__[name]
    assert issubclass(cls, QwenImagePipeline) and cls.reference_area < QwenImagePipeline.reference_area
    pipe = cls.from_pretrained(
        torch_dtype=torch.float32, device="cpu", processor_config=ModelConfig(path=tiny_edit_repo / "processor"),
        model_configs=[ModelConfig(path=tiny_edit_repo / f) for f in ("transformer", "text_encoder", "vae")])
    seen = []
    pipe.dit.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[1], args[6])))
    image = pipe("put the fox on the cushion", edit_image=[str(p) for p in pictures], seed=0, num_inference_steps=2,
                 height=128, width=128, progress_bar=False)  # sampler=tiny's size
    assert image.size == (128, 128)
    length, grids = seen[0]
    assert grids == ((6, 10), (10, 6))  # 128x96 and 96x128 at ~128x128: 160x96 and 96x160 pixels
    assert length == 64 + 60 + 60
