"""Qwen-Image-Edit's picture path against transformers as the oracle: the image preprocessing
(`Qwen2VLImageProcessorPil`, the PIL processor transformers builds without torchvision), the
placeholder expansion of `Qwen2VLProcessor`, and the prompt embeddings of
`Qwen2_5_VLForConditionalGeneration(...).hidden_states[-1]` with pictures."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.core.loader import CheckpointError, load_model, parameters_on_meta
from pipelines.demo.processor import QWEN25_VL_PREPROCESSOR_CONFIG, build_processor_folder
from pipelines.models.qwen2_5_text import QwenImageTextEncoder, QwenTextEncoderParams
from pipelines.models.qwen2_5_vl_encoder import QwenImageVLEncoder, QwenVisionParams
from pipelines.models.qwen_image_vision import QwenVLImageProcessor, QwenVLProcessor, smart_resize

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessorPil  # noqa: E402  (the PIL backend, no torchvision)

IMAGE_PAD = "<|image_pad|>"
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # QwenImageEditPlusPipeline's


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return build_processor_folder(tmp_path_factory.mktemp("qwen_vl") / "processor")


@pytest.fixture(scope="module")
def processor(processor_dir):
    return QwenVLProcessor.from_folder(processor_dir)


@pytest.fixture(scope="module")
def edit_template():
    """(template, drop_idx) as diffusers' QwenImageEditPlusPipeline sets them."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                     processor=None, transformer=None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def _edit_prompt(template: str, instruction: str, n_pictures: int) -> str:
    return template.format("".join(PICTURE.format(i + 1) for i in range(n_pictures)) + instruction)


def _transformers_processor(processor_dir, monkeypatch):
    """transformers' own Qwen2VLProcessor: it insists on a video processor (torchvision), so
    its class check is bypassed; images and text go through its real __call__."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(processor_dir),
                            tokenizer=AutoTokenizer.from_pretrained(processor_dir), video_processor=None)


# ------------------------------------------------------------------ (a) preprocessing


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for height in range(1, 400, 7):
        for width in range(3, 900, 13):
            if max(height, width) / min(height, width) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(height, width, 28, 3136, 12845056)
                continue
            for min_pixels, max_pixels in ((3136, 12845056), (3136, 6272), (56 * 56 * 4, 28 * 28 * 40)):
                assert smart_resize(height, width, 28, min_pixels, max_pixels) == \
                    reference(height, width, 28, min_pixels, max_pixels), (height, width, min_pixels, max_pixels)


IMAGES = [  # (width, height, mode): what each exercises
    (84, 56, "RGB"),  # already a multiple of 28: resized to itself
    (30, 20, "RGB"),  # 600 px < min_pixels 3136: resized up
    (300, 100, "RGB"),  # 3:1, above the small max_pixels below
    (57, 91, "RGBA"),  # transparency composited onto white, odd sizes
    (70, 45, "L"),  # grayscale -> RGB
    (64, 64, "P"),  # palette
]


@pytest.mark.parametrize("max_pixels", [12845056, 56 * 56 * 2])
def test_preprocessing_equals_transformers(max_pixels):
    ours = QwenVLImageProcessor.from_config({**QWEN25_VL_PREPROCESSOR_CONFIG, "max_pixels": max_pixels})
    reference = Qwen2VLImageProcessorPil(**{**QWEN25_VL_PREPROCESSOR_CONFIG, "max_pixels": max_pixels})
    images = [_image(w, h, mode, seed=i) for i, (w, h, mode) in enumerate(IMAGES)]
    for image in images:
        pixel_values, grid = ours([image])
        ref = reference(images=[image], return_tensors="pt")
        assert torch.equal(grid, ref["image_grid_thw"]), (image.size, image.mode)
        assert pixel_values.dtype == ref["pixel_values"].dtype == torch.float32
        assert pixel_values.shape == ref["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
        torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
    # all at once: patches concatenated in order
    pixel_values, grid = ours(images)
    ref = reference(images=images, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)

    # the cases do what they are meant to
    if max_pixels == 12845056:
        assert grid[1].tolist() == [1, 4, 6]  # 30x20 resized up to 84x56
        assert grid[0].tolist() == [1, 4, 6]  # 84x56 kept
    else:
        h, w = grid[2, 1:].tolist()  # 300x100 was above max_pixels: scaled down into it
        assert 300 * 100 > max_pixels >= h * 14 * w * 14


def test_processor_folder_is_read_as_transformers_reads_it(processor_dir):
    ours = QwenVLImageProcessor.from_folder(processor_dir)
    auto = transformers.AutoImageProcessor.from_pretrained(processor_dir)
    assert type(auto).__name__ == "Qwen2VLImageProcessorPil"  # no torchvision here
    assert (ours.min_pixels, ours.max_pixels) == (auto.size["shortest_edge"], auto.size["longest_edge"])
    assert (ours.min_pixels, ours.max_pixels) == (3136, 12845056)
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (14, 2, 2)
    assert (auto.patch_size, auto.temporal_patch_size, auto.merge_size) == (14, 2, 2)
    assert ours.image_mean == tuple(auto.image_mean) and ours.image_std == tuple(auto.image_std)
    assert ours.resample == int(auto.resample) == 3 and ours.rescale_factor == auto.rescale_factor
    image = _image(123, 77, seed=5)
    pixel_values, grid = ours([image])
    ref = auto(images=[image], return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
    # transformers 5.x `size` layout (and min/max_pixels overriding it) read the same way
    written = json.loads((processor_dir / "preprocessor_config.json").read_text())
    assert written["image_processor_type"] == "Qwen2VLImageProcessor"
    sized = {k: v for k, v in written.items() if k not in ("min_pixels", "max_pixels")}
    sized["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    assert QwenVLImageProcessor.from_config(sized) == ours
    assert QwenVLImageProcessor.from_config({**sized, "max_pixels": 5000}).max_pixels == 5000


# ------------------------------------------------------------------ (b) placeholder expansion


@pytest.mark.parametrize("sizes", [[(84, 56)], [(84, 56), (57, 130)]])
def test_processor_expands_placeholders_like_transformers(processor, processor_dir, edit_template, sizes, monkeypatch):
    template, _ = edit_template
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = _edit_prompt(template, "make the sky purple", len(images))
    out = processor([text], images)

    # the tokenizer applied to the text expanded by hand: grid.prod() // merge**2 pads per picture
    grids = out["image_grid_thw"]
    expanded = text
    for grid in grids:
        expanded = expanded.replace(IMAGE_PAD, "\0" * (int(grid.prod()) // 4), 1)
    expanded = expanded.replace("\0", IMAGE_PAD)
    manual = processor.tokenizer([expanded], return_tensors="pt")
    assert torch.equal(out["input_ids"], manual["input_ids"])
    assert torch.equal(out["attention_mask"], manual["attention_mask"])
    per_picture = [int(g.prod()) // 4 for g in grids]
    assert int((out["input_ids"] == 151655).sum()) == sum(per_picture)
    assert per_picture[0] == 6  # 84x56 -> grid 4x6 -> 6 merged tokens

    # transformers' Qwen2VLProcessor itself, for a padded batch as well
    reference = _transformers_processor(processor_dir, monkeypatch)
    texts = [text, _edit_prompt(template, "a much longer instruction that makes this prompt longer", 1)]
    batch_images = images + [_image(40, 160, seed=9)]
    ours = processor(texts, batch_images, padding=True)
    ref = reference(text=texts, images=batch_images, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], atol=1e-6, rtol=0)
    assert not bool(ours["attention_mask"].all())  # the batch was padded


# ------------------------------------------------------------------ (c) prompt embeddings


@pytest.fixture(scope="module")
def loaded_encoders(diffusers_repo):
    root, pipe = diffusers_repo
    vl = load_model([root / "text_encoder"], [QwenImageVLEncoder], torch.float32, "cpu")
    text = load_model([root / "text_encoder"], [QwenImageTextEncoder], torch.float32, "cpu")
    return vl, text, pipe.text_encoder


def _reference(model, inputs):
    """transformers with pictures. `mm_token_type_ids` (1 at image tokens) is what its
    processor returns and what transformers 5.x needs to build the 3-D M-RoPE positions."""
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                    mm_token_type_ids=(inputs["input_ids"] == 151655).long(), output_hidden_states=True)
    return out.hidden_states[-1]


def test_loaded_vl_encoder_holds_the_vision_tower(loaded_encoders, diffusers_repo):
    vl, text, reference = loaded_encoders
    assert type(vl) is QwenImageVLEncoder and type(text) is QwenImageTextEncoder
    state = vl.state_dict()
    assert any(k.startswith("visual.blocks.0.") for k in state) and not any("lm_head" in k for k in state)
    ref_state = reference.state_dict()
    for key, tensor in state.items():
        ref_key = key.replace("visual.", "model.visual.", 1) if key.startswith("visual.") else \
            key.replace("model.", "model.language_model.", 1)
        assert torch.equal(tensor, ref_state[ref_key]), key
    assert vl.vision_params.depth == 1 and vl.vision_params.hidden_size == 16
    assert vl.vision_params.out_hidden_size == vl.params.hidden_size == 32
    assert vl.image_token_id == reference.config.image_token_id == 151655


@pytest.mark.parametrize("sizes", [[(84, 56)], [(84, 56), (56, 112)]], ids=["one_picture", "two_pictures"])
def test_prompt_embeddings_with_pictures_equal_transformers(loaded_encoders, processor, edit_template, sizes):
    vl, _, reference = loaded_encoders
    template, drop_idx = edit_template
    images = [_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    inputs = processor([_edit_prompt(template, "turn the cat into a dog", len(images))], images)
    with torch.no_grad():
        got = vl(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
    ref = _reference(reference, inputs)
    assert got.shape == ref.shape == (1, inputs["input_ids"].shape[1], 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got.shape[1] > drop_idx  # what the edit pipeline keeps is there

    # the pictures matter: another picture gives other embeddings
    other = processor([_edit_prompt(template, "turn the cat into a dog", len(images))],
                      [_image(w, h, seed=99) for w, h in sizes])
    with torch.no_grad():
        changed = vl(other["input_ids"], other["attention_mask"], other["pixel_values"], other["image_grid_thw"])
    assert (changed - got).abs().max() > 1e-3


def test_padded_batch_and_positions_equal_transformers(loaded_encoders, processor, edit_template):
    vl, _, reference = loaded_encoders
    template, _ = edit_template
    texts = [_edit_prompt(template, "red", 1), _edit_prompt(template, "a longer instruction, with more words", 2)]
    images = [_image(84, 56, seed=1), _image(56, 84, seed=2), _image(112, 56, seed=3)]
    inputs = processor(texts, images)
    assert not bool(inputs["attention_mask"].all())
    positions = vl.mrope_position_ids(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    ref_positions, _ = reference.model.get_rope_index(
        inputs["input_ids"], (inputs["input_ids"] == 151655).long(), inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    assert torch.equal(positions, ref_positions)
    with torch.no_grad():
        got = vl(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(got, _reference(reference, inputs), atol=1e-5, rtol=1e-5)

    # left padding: positions count the kept tokens only, as transformers does
    shift = [int((1 - m).sum()) for m in inputs["attention_mask"]]
    left = dict(inputs)
    left["input_ids"] = torch.stack([r.roll(s) for r, s in zip(inputs["input_ids"], shift)])
    left["attention_mask"] = torch.stack([r.roll(s) for r, s in zip(inputs["attention_mask"], shift)])
    assert not bool(left["attention_mask"][:, 0].all()) and bool(left["attention_mask"][:, -1].all())
    keep = left["attention_mask"].bool()
    with torch.no_grad():
        got_left = vl(left["input_ids"], left["attention_mask"], left["pixel_values"], left["image_grid_thw"])
    torch.testing.assert_close(got_left[keep], _reference(reference, left)[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_left[keep], got[inputs["attention_mask"].bool()], atol=1e-5, rtol=1e-5)


def test_text_only_equals_the_text_encoder_exactly(loaded_encoders, processor, edit_template):
    vl, text, reference = loaded_encoders
    template, _ = edit_template
    inputs = processor([template.format("a cat on a sofa"), template.format("a dog")])
    assert set(inputs) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        got = vl(inputs["input_ids"], inputs["attention_mask"])
        expected = text(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, _reference(reference, inputs), atol=1e-5, rtol=1e-5)


# A second tiny model: two vision blocks, the first with window attention (the fixture's
# only block attends fully), stored in the newer `model.visual.*` / `model.language_model.*`
# layout.
@pytest.fixture(scope="module")
def windowed_checkpoint(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=56))
    torch.manual_seed(4)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if ("norm" in name or "ln_q" in name) else 0.3 * torch.randn_like(p))
    saved = tmp_path_factory.mktemp("windowed_saved")
    model.save_pretrained(saved)
    folder = tmp_path_factory.mktemp("windowed_new_layout")
    tensors = {}
    for file in saved.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                new = ("model." + key) if key.startswith("visual.") else \
                    key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key
                tensors[new] = f.get_tensor(key)
    save_file(tensors, folder / "model.safetensors")
    shutil.copy(saved / "config.json", folder / "config.json")
    return folder, model


def test_window_attention_and_newer_layout_equal_transformers(windowed_checkpoint, processor, edit_template):
    folder, reference = windowed_checkpoint
    vl = load_model([folder], [QwenImageVLEncoder], torch.float32, "cpu")
    assert vl.vision_params.window_size == 56 and vl.vision_params.fullatt_block_indexes == [1]
    template, _ = edit_template
    # 196x140 -> merged grid 7x5, windows of 2x2 merged tokens: several windows, ragged edges
    inputs = processor([_edit_prompt(template, "x", 2)], [_image(200, 130, seed=7), _image(84, 56, seed=8)])
    with torch.no_grad():
        got = vl(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(got, _reference(reference, inputs), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ (d) real sizes on meta

REAL_VISION_PARAMETERS = 676_550_144  # Qwen2.5-VL-7B's vision tower (patch embed, 32 blocks, merger)

# The hub's Qwen-Image(-Edit) text_encoder/config.json (transformers 4.53 wrote both layouts).
REAL_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "hidden_size": 1280,
        "in_channels": 3, "in_chans": 3, "intermediate_size": 3420, "model_type": "qwen2_5_vl",
        "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 112,
    },
}


def _real_checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Qwen2.5-VL-7B's key set and shapes in the legacy on-disk layout, from transformers'
    own model built on the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        vision_config={k: v for k, v in REAL_CONFIG["vision_config"].items()
                       if k not in ("model_type", "in_chans", "spatial_patch_size")},
        tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = key[len("model."):]
        shapes[key] = tuple(tensor.shape)
    return shapes


def test_real_checkpoint_keys_and_shapes_are_accepted_on_meta():
    disk = _real_checkpoint_shapes()
    assert "lm_head.weight" in disk and "visual.merger.mlp.2.weight" in disk and "model.norm.weight" in disk
    cls = QwenImageVLEncoder
    assert all(cls.owns_checkpoint_key(k) for k in disk)
    converted = {new: shape for key, shape in disk.items() if (new := cls.convert_checkpoint_key(key)) is not None}
    assert set(disk) - {k for k in disk if cls.convert_checkpoint_key(k)} == {"lm_head.weight"}
    assert all(k in converted for k in cls.CHECKPOINT_REQUIRED_KEYS)
    vision = sum(torch.Size(s).numel() for k, s in converted.items() if k.startswith("visual."))
    print(f"Qwen2.5-VL-7B vision tower: {vision:,} parameters")
    assert vision == REAL_VISION_PARAMETERS
    for config in (None, REAL_CONFIG, {"text_config": REAL_CONFIG, "vision_config": REAL_CONFIG["vision_config"]}):
        with parameters_on_meta():
            module = cls.from_checkpoint(converted, config)
        assert all(p.is_meta for p in module.parameters())
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == converted, config is None
        assert module.vision_params == QwenVisionParams() and module.params == QwenTextEncoderParams()
        assert module.image_token_id == 151655
    # the defaults are transformers' Qwen2_5_VLVisionConfig except where Qwen2.5-VL-7B differs
    ours = QwenVisionParams().to_transformers_config()
    theirs = transformers.Qwen2_5_VLVisionConfig()
    differing = {name for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                                   "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
                                   "window_size", "hidden_act", "tokens_per_second")
                 if getattr(ours, name) != getattr(theirs, name)}
    assert differing == {"hidden_size", "tokens_per_second"}
    assert list(ours.fullatt_block_indexes) == list(theirs.fullatt_block_indexes) == [7, 15, 23, 31]
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"] == 10000.0


# ------------------------------------------------------------------ (e) clear errors


def test_checkpoint_without_vision_tower_is_refused(diffusers_repo, tmp_path):
    root, _ = diffusers_repo
    tensors = {}
    for file in (root / "text_encoder").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")})
    folder = tmp_path / "text_only"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    shutil.copy(root / "text_encoder" / "config.json", folder / "config.json")

    with pytest.raises(CheckpointError) as error:
        load_model([folder], [QwenImageVLEncoder], torch.float32, "cpu")
    message = str(error.value)
    assert str(folder / "model.safetensors") in message
    assert "QwenImageVLEncoder" in message and "visual.patch_embed.proj.weight" in message
    assert "fetch" in message  # the loader's fix
    # the same files are a fine text-only encoder
    assert type(load_model([folder], [QwenImageTextEncoder], torch.float32, "cpu")) is QwenImageTextEncoder
    # asked directly, the class names what is missing and where a vision tower comes from
    shapes = {QwenImageVLEncoder.convert_checkpoint_key(k): tuple(v.shape) for k, v in tensors.items()
              if QwenImageVLEncoder.convert_checkpoint_key(k) is not None}
    with pytest.raises(ValueError, match=r"no vision tower .*visual\.merger\.mlp\.0\.weight.*Qwen-Image-Edit"):
        QwenImageVLEncoder.vision_params_from_checkpoint(shapes, None)


def test_processor_folder_errors(processor_dir, tmp_path):
    no_config = tmp_path / "no_config"
    shutil.copytree(processor_dir, no_config)
    (no_config / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{no_config}.*preprocessor_config\.json.*processor/"):
        QwenVLProcessor.from_folder(no_config)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(processor_dir / "preprocessor_config.json", no_tokenizer)
    with pytest.raises(FileNotFoundError, match=rf"{no_tokenizer}.*no tokenizer files"):
        QwenVLProcessor.from_folder(no_tokenizer)

    with pytest.raises(FileNotFoundError, match="no such folder"):
        QwenVLProcessor.from_folder(tmp_path / "missing")

    broken = tmp_path / "broken"
    shutil.copytree(processor_dir, broken)
    (broken / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json.*JSON"):
        QwenVLProcessor.from_folder(broken)

    # the tokenizer is read without transformers: its faults name the file and the fix
    broken_tokenizer = tmp_path / "broken_tokenizer"
    shutil.copytree(processor_dir, broken_tokenizer)
    text = (broken_tokenizer / "tokenizer.json").read_text(encoding="utf-8")
    (broken_tokenizer / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{broken_tokenizer / 'tokenizer.json'}: the `tokenizers` library cannot "
                                         r"read it .*fetch the model's `tokenizer/` folder again"):
        QwenVLProcessor.from_folder(broken_tokenizer)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        shutil.copy(processor_dir / name, only_config)
    with pytest.raises(FileNotFoundError, match=rf"{only_config}: no tokenizer\.json and no vocab\.json and "
                                                r"merges\.txt \(found: .*tokenizer_config\.json\)"):
        QwenVLProcessor.from_folder(only_config)


def test_processor_tokenizer_gives_transformers_ids(processor, processor_dir, edit_template):
    """The processor's tokenizer (QwenTokenizer, no transformers) against AutoTokenizer on the same
    folder: edit prompts with long <|image_pad|> runs, a padded batch."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(processor_dir)
    assert type(processor.tokenizer).__name__ == "QwenTokenizer"
    assert processor.image_token_id == reference.convert_tokens_to_ids(IMAGE_PAD) == 151655
    template, _ = edit_template
    texts = [_edit_prompt(template, "make the sky purple", 1).replace(IMAGE_PAD, IMAGE_PAD * 300),
             _edit_prompt(template, "两张图：把猫换成狗 🐶", 2).replace(IMAGE_PAD, IMAGE_PAD * 7)]
    ours = processor.tokenizer(texts, padding=True, return_tensors="pt")
    ref = reference(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    assert int((ours["input_ids"] == 151655).sum()) == 300 + 14


def test_bad_inputs_are_clear_errors(processor, loaded_encoders, edit_template):
    template, _ = edit_template
    text = _edit_prompt(template, "x", 1)
    with pytest.raises(TypeError, match=r"image 1: expected a PIL\.Image\.Image, got numpy\.ndarray.*Image\.open"):
        processor([_edit_prompt(template, "x", 2)], [_image(56, 56), np.zeros((56, 56, 3), np.uint8)])
    with pytest.raises(TypeError, match=r"image 0: .*got builtins\.str"):
        processor.image_processor(["picture.png"])
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image\(s\)"):
        processor([text], [_image(56, 56), _image(56, 56)])
    with pytest.raises(ValueError, match="aspect ratio"):
        processor([text], [_image(300, 1)])

    vl = loaded_encoders[0]
    inputs = processor([text], [_image(56, 56)])
    with pytest.raises(ValueError, match="no pixel_values"):
        vl(inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="image_grid_thw describes"):
        vl(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"][:-1], inputs["image_grid_thw"])
    bigger = processor([text], [_image(112, 56)])
    with pytest.raises(ValueError, match="features"):
        vl(inputs["input_ids"], inputs["attention_mask"], bigger["pixel_values"], bigger["image_grid_thw"])
