"""Qwen-Image 2.1's prompt encoder (Qwen3-VL) against transformers and diffusers as the oracles.

A tiny Qwen3-VL (4 query heads on 2 key/value heads, interleaved M-RoPE, a vision tower of 3
blocks with 2 DeepStack mergers, every weight random and non-zero) is written by transformers'
own save_pretrained, sharded, and loaded through our loader. Checked, in float32: the language
model's hidden states before the final norm (what diffusers reads with its hook), padded and
not, with and without pictures; the vision tower's tokens and DeepStack features; the 3-D
positions; the picture processor's patches and grids against transformers' (PIL) Qwen2-VL image
processor with Qwen3-VL's settings; the token ids against transformers' tokenizer and
Qwen3VLProcessor; and the prompt embeddings against diffusers' QwenImage21Pipeline's encode
step with the same tiny encoder and processor. The real model's keys and shapes are checked on
the meta device, and the 1.x (Qwen2.5-VL) classes and this one refuse each other's checkpoint."""
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
from pipelines.demo.processor import QWEN3_VL_PREPROCESSOR_CONFIG, build_qwen_image_21_processor_folder
from pipelines.models.qwen2_5_text import QwenImageTextEncoder
from pipelines.models.qwen2_5_vl_encoder import QwenImageVLEncoder
from pipelines.models.qwen3_text import Qwen3TextParams
from pipelines.models.qwen3_vl_encoder import QwenImage21TextEncoder, mrope_positions
from pipelines.models.qwen3_vl_processor import QwenImage21Processor, composite_over_white, prompt_text
from pipelines.models.qwen3_vl_vision import Qwen3VisionParams
from pipelines.models.qwen_image_vision import QwenVLImageProcessor
from tests.support.qwen21 import SMALL_SIZES, TEXT_HIDDEN, TINY_TEXT_CONFIG, qwen3_vl_processor
from tests.support.weights import randomize_

transformers = pytest.importorskip("transformers")

IMAGE_PAD_ID = 151655
HIDDEN = TEXT_HIDDEN
TINY_CONFIG = TINY_TEXT_CONFIG


def _picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return build_qwen_image_21_processor_folder(tmp_path_factory.mktemp("qwen_image_21") / "processor")


@pytest.fixture(scope="module")
def processor(processor_dir):
    return QwenImage21Processor.from_folder(processor_dir)


@pytest.fixture(scope="module")
def small_processor(processor, processor_dir):
    """Ours, and transformers' Qwen3VLProcessor (tests/support/qwen21.py), reading small pictures as they are."""
    small = QwenVLImageProcessor.from_config({**QWEN3_VL_PREPROCESSOR_CONFIG, **SMALL_SIZES})
    ours = QwenImage21Processor(processor.tokenizer, small, processor.system_tokens)
    return ours, qwen3_vl_processor(processor_dir, SMALL_SIZES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, transformers' model, ours loaded from the folder by our loader)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    reference = randomize_(Qwen3VLForConditionalGeneration(Qwen3VLConfig(**TINY_CONFIG)), seed=21).eval()
    folder = tmp_path_factory.mktemp("qwen3_vl_tiny") / "text_encoder"
    reference.save_pretrained(folder, max_shard_size="8MB")
    return folder, reference, load_model([folder], [QwenImage21TextEncoder], torch.float32, "cpu")


def _reference(model, inputs: dict, final_norm: bool = False) -> torch.Tensor:
    """transformers' hidden_states[-1], with diffusers' hook that neutralises the final norm."""
    hook = None if final_norm else model.model.language_model.norm.register_forward_hook(lambda m, a, o: a[0])
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    return out.hidden_states[-1]


def _assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert ref.std() > 0.1  # not degenerate
    torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


# ------------------------------------------------------------------ the checkpoint


def test_save_pretrained_layout_loads_every_tensor(checkpoint):
    folder, reference, ours = checkpoint
    assert len(list(folder.glob("model-*.safetensors"))) > 1  # sharded, as on the hub
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys.update(f.keys())
    assert "lm_head.weight" in keys and all(k.startswith(("model.language_model.", "model.visual.", "lm_head."))
                                            for k in keys)
    state = ours.state_dict()
    assert set(state) == keys - {"lm_head.weight"}
    ref_state = reference.state_dict()
    assert all(torch.equal(tensor, ref_state[key]) for key, tensor in state.items())
    assert ours.text_params == Qwen3TextParams(vocab_size=151936, hidden_size=HIDDEN, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=16, mrope_section=[2, 3, 3])
    assert ours.vision_params.deepstack_visual_indexes == [0, 2] and ours.vision_params.num_position_embeddings == 16
    assert ours.image_token_id == IMAGE_PAD_ID


def test_real_model_keys_and_shapes_on_meta():
    """Qwen3-VL-8B (the 2.1 text encoder: 4096 wide) built by transformers on the meta device:
    every key is ours, and our module built from its shapes (with or without its config) has
    exactly its keys and shapes, at our defaults."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]))
    with torch.device("meta"):
        theirs = Qwen3VLForConditionalGeneration(config)
    disk = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    cls = QwenImage21TextEncoder
    assert all(cls.owns_checkpoint_key(k) for k in disk)
    assert not any(QwenImageTextEncoder.owns_checkpoint_key(k) for k in disk if "k_norm" in k or "deepstack" in k)
    shapes = {new: s for k, s in disk.items() if (new := cls.convert_checkpoint_key(k)) is not None}
    assert set(disk) - set(shapes) == {"lm_head.weight"}
    for given in (None, config.to_dict()):
        with parameters_on_meta():
            module = cls.from_checkpoint(shapes, given)
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes
        assert module.text_params == Qwen3TextParams() and module.vision_params == Qwen3VisionParams()
    assert module.model.language_model.rotary_emb.inv_freq.device.type == "cpu"  # buffers stay real


def test_qwen25_and_qwen3_checkpoints_are_refused_by_each_other(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    for cls in (QwenImageTextEncoder, QwenImageVLEncoder):  # 1.x classes: the 2.1 encoder is not theirs
        with pytest.raises(CheckpointError) as error:
            load_model([folder], [cls], torch.float32, "cpu")
        message = str(error.value)
        assert f"do not belong to {cls.__name__}" in message and "self_attn.k_norm.weight" in message, message
    # a Qwen2.5-VL checkpoint, in the legacy layout save_pretrained writes and in the newer one
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    old = randomize_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]))), seed=4)
    old.save_pretrained(tmp_path / "legacy")
    with pytest.raises(CheckpointError, match="belong to none of the models .*QwenImage21TextEncoder"):
        load_model([tmp_path / "legacy"], [QwenImage21TextEncoder], torch.float32, "cpu")
    newer = {k: v.contiguous() for k, v in old.state_dict().items()}  # in memory, transformers 5 has the newer names
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in newer and "model.visual.merger.ln_q.weight" in newer
    (tmp_path / "newer").mkdir()
    save_file(newer, tmp_path / "newer" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"not a QwenImage21TextEncoder checkpoint: it lacks .*q_norm.* holds "
                                              r"\d+ key\(s\) of another model \(.*model\.visual\.blocks\.0\.mlp"):
        load_model([tmp_path / "newer"], [QwenImage21TextEncoder], torch.float32, "cpu")


# ------------------------------------------------------------------ the language model and the vision tower


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_language_model_equals_transformers(checkpoint, padded):
    _, reference, ours = checkpoint
    ids = torch.randint(0, 151000, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    with torch.no_grad():
        got = ours(ids, mask)
        normed = ours.model.language_model.norm(got)
    inputs = dict(input_ids=ids, attention_mask=mask)
    _assert_close(got, _reference(reference, inputs))
    _assert_close(normed, _reference(reference, inputs, final_norm=True))  # transformers' last_hidden_state
    assert (got - normed).abs().max() > 0.1  # the two differ: the encoder reads the one before the norm


def test_vision_tower_equals_transformers(checkpoint, small_processor):
    _, reference, ours = checkpoint
    processor, _ = small_processor
    pixel_values, grids = processor.image_processor([_picture(77, 123, seed=1), _picture(200, 64, seed=2)])
    assert grids.tolist() == [[1, 8, 4], [1, 4, 12]]  # odd sizes resized to multiples of 32
    with torch.no_grad():
        tokens, deepstack = ours.model.visual(pixel_values, grids)
        ref = reference.model.get_image_features(pixel_values, grids)
    _assert_close(tokens, torch.cat(ref.pooler_output))
    assert tokens.shape == (8 + 12, HIDDEN) and len(deepstack) == len(ref.deepstack_features) == 2
    for got, theirs in zip(deepstack, ref.deepstack_features):
        _assert_close(got, torch.cat(theirs))
    assert (deepstack[0] - deepstack[1]).abs().max() > 0.1


def test_pictures_positions_and_deepstack_equal_transformers(checkpoint, small_processor):
    _, reference, ours = checkpoint
    processor, theirs = small_processor
    pictures = [_picture(96, 64, seed=3), _picture(64, 160, seed=4)]
    inputs = processor(["red", "a longer prompt, with more words in it"], pictures)
    assert not bool(inputs["attention_mask"].all())
    ids, mask, grids = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    ref_positions, _ = reference.model.get_rope_index(ids, (ids == IMAGE_PAD_ID).long(), grids, attention_mask=mask)
    assert torch.equal(mrope_positions(ids, mask, grids, IMAGE_PAD_ID, 2), ref_positions)
    with torch.no_grad():
        got = ours(ids, mask, inputs["pixel_values"], grids)
    ref = _reference(reference, dict(inputs, mm_token_type_ids=(ids == IMAGE_PAD_ID).long()))
    real = mask.bool()
    _assert_close(got[real], ref[real])
    # the DeepStack features are injected: without them the hidden states differ
    lm = ours.model.language_model
    with torch.no_grad():
        embeds = lm.embed_tokens(ids).masked_scatter((ids == IMAGE_PAD_ID)[..., None].expand(-1, -1, HIDDEN),
                                                     ours.model.visual(inputs["pixel_values"], grids)[0])
        plain = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=ref_positions)
    assert (plain[real] - got[real]).abs().max() > 1e-2


# ------------------------------------------------------------------ the processor and the tokenizer


@pytest.mark.parametrize("size,mode", [((123, 77), "RGB"), ((301, 517), "RGBA"), ((2000, 40), "RGB"),
                                       ((512, 384), "RGBA")], ids=["small_odd", "rgba_odd", "wide", "rgba"])
def test_picture_processor_equals_transformers(processor, processor_dir, size, mode):
    picture = _picture(*size, mode=mode, seed=7)
    ours = processor.image_processor
    auto = transformers.AutoImageProcessor.from_pretrained(processor_dir)
    assert type(auto).__name__ == "Qwen2VLImageProcessorPil"  # no torchvision here
    assert (ours.patch_size, ours.merge_size, ours.min_pixels, ours.image_mean) == (16, 2, 65536, (0.5,) * 3)
    if mode == "RGBA":  # diffusers' QwenImage21Pipeline composites it over white before the processor
        white = Image.new("RGB", picture.size, (255, 255, 255))
        white.paste(picture, mask=picture.getchannel("A"))
        flattened = composite_over_white(picture)
        assert flattened.mode == "RGB" and np.array_equal(np.asarray(flattened), np.asarray(white))
        picture = flattened
    pixel_values, grids = ours([picture])
    ref = auto(images=[picture], return_tensors="pt")
    assert torch.equal(grids, ref["image_grid_thw"])
    torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
    assert grids[0, 1] * grids[0, 2] * 256 >= 65536 and pixel_values.shape[1] == 3 * 2 * 16 * 16


def test_token_ids_equal_transformers(processor_dir, small_processor, tmp_path):
    ours, theirs = small_processor
    sys_message = [{"role": "system", "content": [{"type": "text", "text": "Comprehend and analyze the provided "
                                                                                "prompt."}]}]
    assert ours.system_tokens == len(theirs.apply_chat_template(sys_message, tokenize=True, return_dict=False)[0])
    assert ours.system_tokens == 14
    prompts = ["", "一只猫 on a skateboard, 3 <think> 42!\n\n  spaced"]
    for pictures in ([], [_picture(96, 64, seed=1), _picture(64, 64, mode="RGBA", seed=2)]):
        got = ours(prompts, pictures)
        texts = [prompt_text(p, len(pictures)) for p in prompts]
        ref = theirs(text=texts, images=[composite_over_white(p) for p in pictures] * len(prompts) or None,
                     padding=True, padding_side="left", return_tensors="pt")
        for key in ("input_ids", "attention_mask", *(("pixel_values", "image_grid_thw") if pictures else ())):
            assert torch.equal(got[key], ref[key]), key
    assert int((got["input_ids"] == IMAGE_PAD_ID).sum()) == 2 * (6 + 4)
    # the folder as the hub may hold it: vocab.json, merges.txt, added_tokens.json (no tokenizer.json/config)
    bare = tmp_path / "processor"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "preprocessor_config.json", "chat_template.jinja"):
        shutil.copy(processor_dir / name, bare / name)
    reference = transformers.Qwen2Tokenizer.from_pretrained(bare)
    text = prompt_text("<tool_response> 你好 </think> 1234", 0)
    assert QwenImage21Processor.from_folder(bare).tokenizer(text)["input_ids"] == reference(text)["input_ids"]


def test_prompt_embeddings_equal_diffusers(checkpoint, small_processor):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    _, reference, ours = checkpoint
    processor, theirs = small_processor
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=reference,
                               processor=theirs, transformer=None)
    assert pipe._drop_idx == processor.system_tokens
    prompts = ["", "a capybara in a wizard hat, reading by candlelight"]
    pictures = [_picture(96, 64, mode="RGBA", seed=5), _picture(64, 128, seed=6)]
    for given in (None, pictures):
        with torch.no_grad():
            ref = pipe._get_qwen_prompt_embeds(prompts, given, device="cpu")
            inputs = processor(prompts, given)
            got = ours.encode_prompt(inputs["input_ids"], inputs["attention_mask"], processor.system_tokens,
                                     inputs.get("pixel_values"), inputs.get("image_grid_thw"))
        _assert_close(got[0], ref[0])
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
        assert got[1].dtype == torch.long and got[2].dtype == torch.bool
        assert bool(got[2].any()) == (given is not None) and not bool(got[1].all())  # prompts of two lengths


# ------------------------------------------------------------------ clear errors


def test_bad_inputs_are_clear_errors(checkpoint, small_processor, processor_dir, tmp_path):
    _, _, ours = checkpoint
    processor, _ = small_processor
    inputs = processor(["a cat"], [_picture(64, 64)])
    with pytest.raises(ValueError, match="no pictures were given"):
        ours(inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="pixel_values has shape .* pass both from the same processor call"):
        ours(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"][:-4], inputs["image_grid_thw"])
    with pytest.raises(ValueError, match=r"prompt 1 holds <\|image_pad\|>"):
        processor(["fine", "sneaky <|image_pad|>"])
    without = tmp_path / "processor"
    shutil.copytree(processor_dir, without)
    (without / "chat_template.jinja").unlink()
    with pytest.raises(FileNotFoundError, match="no chat template .*build_qwen_image_21_processor_folder"):
        QwenImage21Processor.from_folder(without)
    (without / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].role }}"}))
    with pytest.raises(ValueError, match="renders the system turn as 'system'"):
        QwenImage21Processor.from_folder(without)
