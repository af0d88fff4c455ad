"""ControlNets (InstantX Union and Inpainting) and mask inpainting: parity with diffusers'
QwenImageControlNetPipeline (one condition, two through one Union net, with and without CFG, a
guidance window), QwenImageControlNetInpaintPipeline and QwenImageInpaintPipeline on tiny
checkpoints written by diffusers' save_pretrained and loaded through our loader; the start/end
rule against diffusers' control_guidance_start/end; two nets loaded together; a net of another
width refused; VRAM management and a LoRA on the DiT with a ControlNet.

The tiny model: the session's text encoder, VAE and tokenizer (tests/conftest.py) with a DiT of 5
blocks, so that the nets' intervals are not trivial: a Union net of 2 blocks (its samples go to
blocks 0-2 and 3-4) and an Inpainting net of 3 (blocks 0-1, 2-3, 4). The nets come from diffusers'
`from_transformer` and get random weights everywhere, the zero-initialised projections included."""
from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from pipelines import ControlNetInput, SettingError
from pipelines.core.control import acts_at, diffusers_steps, from_diffusers_window
from pipelines.qwen_image import ModelConfig, QwenImagePipeline
from tests.conftest import TINY_TEXT_HIDDEN
from tests.support.weights import randomize_

PROMPT = "A red fox sitting in fresh snow, soft morning light, 35mm photo"
SIZE = dict(height=64, width=64)
STEPS = 4


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_real_image(a: np.ndarray) -> None:
    assert ((a > 2) & (a < 253)).mean() > 0.5 and a.std() > 5, "a flat or saturated image compares nothing"


def assert_same_image(ours: Image.Image, reference: Image.Image) -> None:
    a, b = pixels(ours), pixels(reference)
    assert a.shape == b.shape
    assert_real_image(b)
    assert np.abs(a - b).max() <= 2, f"max pixel difference {np.abs(a - b).max()}"


def assert_changes(image: Image.Image, other: Image.Image, by: float = 3.0) -> None:
    """The two images differ clearly (mean |diff| over `by` of 255): the thing compared matters."""
    diff = np.abs(pixels(image) - pixels(other)).mean()
    assert diff > by, f"mean pixel difference {diff:.2f}: the change has no visible effect"


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth random picture (a control map or a photo): noise upsampled, so the VAE sees structure."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def mask_picture(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """White (repaint) on the right half of a centred square, black elsewhere; grey levels at 0.4 and 0.6
    of white elsewhere test the binarisation."""
    w, h = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle([w // 2, h // 4, 3 * w // 4 - 1, 3 * h // 4 - 1], fill=255)
    draw.rectangle([0, 0, w // 8 - 1, h // 8 - 1], fill=int(0.6 * 255))
    draw.rectangle([0, h - h // 8, w // 8 - 1, h - 1], fill=int(0.4 * 255))
    return mask


def near_deterministic_vae(vae):
    """The VAE with a posterior of std e^-15 (log-variance at diffusers' floor, -30): diffusers'
    ControlNetInpaint pipeline samples the masked picture's latents from the unseeded global
    generator, we take the mean; with this VAE both are the same up to 1e-7."""
    vae = copy.deepcopy(vae)
    z = vae.config.z_dim
    with torch.no_grad():
        vae.quant_conv.weight[z:] = 0
        vae.quant_conv.bias[z:] = -30.0
    return vae


@pytest.fixture(scope="module")
def models(diffusers_repo, tmp_path_factory):
    """diffusers' modules and the folders they were written to."""
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    root, reference = diffusers_repo
    out = tmp_path_factory.mktemp("controlnet")
    transformer = randomize_(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=5, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_HIDDEN, axes_dims_rope=(4, 14, 14)), seed=21).eval()
    union = randomize_(QwenImageControlNetModel.from_transformer(
        transformer, num_layers=2, attention_head_dim=32, num_attention_heads=2), seed=22).eval()
    inpaint = randomize_(QwenImageControlNetModel.from_transformer(
        transformer, num_layers=3, attention_head_dim=32, num_attention_heads=2, extra_condition_channels=4),
        seed=23).eval()
    vae = near_deterministic_vae(reference.vae).eval()
    for name, module in (("transformer", transformer), ("union", union), ("inpaint", inpaint), ("vae_mean", vae)):
        module.save_pretrained(out / name)
    return SimpleNamespace(root=root, out=out, transformer=transformer, union=union, inpaint=inpaint, vae=vae,
                           reference=reference)


def ours_from(m, *nets: str, vae: str | None = None, **kwargs) -> QwenImagePipeline:
    """Our pipeline on the tiny model with the ControlNets `nets` (folders under m.out), in that order."""
    configs = [ModelConfig(path=m.out / "transformer"), ModelConfig(path=m.root / "text_encoder"),
               ModelConfig(path=m.out / vae if vae else m.root / "vae")]
    configs += [ModelConfig(path=m.out / net) for net in nets]
    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             tokenizer_config=ModelConfig(path=m.root / "tokenizer"), **kwargs)


def diffusers_pipe(m, cls_name: str, controlnet=None, vae=None):
    import diffusers

    components = {**m.reference.components, "transformer": m.transformer}
    if vae is not None:
        components["vae"] = vae
    if controlnet is not None:
        components["controlnet"] = controlnet
    return getattr(diffusers, cls_name)(**components)


@pytest.fixture(scope="module")
def union_pipe(models):
    return ours_from(models, "union")


def generate(pipe, cfg_scale: float = 4.0, seed: int = 5, **call) -> Image.Image:
    return pipe(PROMPT, negative_prompt=" ", cfg_scale=cfg_scale, seed=seed, num_inference_steps=STEPS,
                progress_bar=False, **SIZE, **call)


def reference_call(pipe, cfg_scale: float = 4.0, seed: int = 5, **call) -> Image.Image:
    return pipe(PROMPT, negative_prompt=" " if cfg_scale > 1 else None, true_cfg_scale=cfg_scale,
                num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(seed), **SIZE,
                **call).images[0]


# ---------------------------------------------------------------- InstantX Union


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_union_one_condition_matches_diffusers(models, union_pipe, cfg_scale):
    reference = diffusers_pipe(models, "QwenImageControlNetPipeline", controlnet=models.union)
    control = picture(1, (48, 80))  # another size: resized to the generation size as diffusers does
    expected = reference_call(reference, cfg_scale, control_image=control, controlnet_conditioning_scale=0.8)
    image = generate(union_pipe, cfg_scale, controlnet_inputs=[ControlNetInput(image=control, scale=0.8)])
    assert_same_image(image, expected)
    assert_changes(image, generate(union_pipe, cfg_scale))
    assert union_pipe.timings["denoise_steps"] == STEPS
    if cfg_scale > 1:  # both branches as one batch-2 forward: the same samples broadcast over the batch
        batched = generate(union_pipe, cfg_scale, controlnet_inputs=[ControlNetInput(image=control, scale=0.8)],
                           cfg_batch=True)
        assert_same_image(batched, expected)


def test_two_conditions_through_one_union_net_match_diffusers_multi(models, union_pipe):
    """diffusers' QwenImageMultiControlNetModel with one Union net: each condition runs the net, the
    scaled samples add up."""
    from diffusers import QwenImageMultiControlNetModel

    reference = diffusers_pipe(models, "QwenImageControlNetPipeline",
                               controlnet=QwenImageMultiControlNetModel([models.union]))
    first, second = picture(1), picture(2)
    expected = reference_call(reference, control_image=[first, second], controlnet_conditioning_scale=[0.7, 0.5])
    inputs = [ControlNetInput(image=first, scale=0.7), ControlNetInput(image=second, scale=0.5)]
    image = generate(union_pipe, controlnet_inputs=inputs)
    assert_same_image(image, expected)
    assert_changes(image, generate(union_pipe, controlnet_inputs=inputs[:1]))


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 10, 30])
def test_start_end_map_to_diffusers_control_guidance_window(steps):
    """For every diffusers window (control_guidance_start/end on a grid of tenths), the DiffSynth
    (start, end) from from_diffusers_window acts at exactly diffusers' steps, and about 1 - start_d,
    1 - end_d does too where a step boundary is not within a step of it."""
    grid = [i / 10 for i in range(11)]
    for start_d in grid:
        for end_d in (e for e in grid if e > start_d):
            kept = diffusers_steps(start_d, end_d, steps)
            if not kept:
                with pytest.raises(ValueError, match="leave no step"):
                    from_diffusers_window(start_d, end_d, steps)
                continue
            start, end = from_diffusers_window(start_d, end_d, steps)
            assert 0 <= end <= start <= 1
            control = ControlNetInput(start=start, end=end)
            assert [i for i in range(steps) if acts_at(control, i, steps)] == kept, (start_d, end_d)
    everywhere = ControlNetInput()
    assert all(acts_at(everywhere, i, steps) for i in range(steps)) and diffusers_steps(0.0, 1.0, steps) == list(
        range(steps))


def test_start_end_window_matches_diffusers_control_guidance(models, union_pipe):
    """control_guidance_start=0.25, end=0.75 over 4 steps: the net acts at steps 1 and 2 only; ours
    with the mapped (start, end) = (2/3, 1/3) gives diffusers' image."""
    reference = diffusers_pipe(models, "QwenImageControlNetPipeline", controlnet=models.union)
    control = picture(3)
    expected = reference_call(reference, control_image=control, control_guidance_start=0.25,
                              control_guidance_end=0.75)
    start, end = from_diffusers_window(0.25, 0.75, STEPS)
    assert (start, end) == pytest.approx((2 / 3, 1 / 3))
    image = generate(union_pipe, controlnet_inputs=[ControlNetInput(image=control, start=start, end=end)])
    assert_same_image(image, expected)
    assert_changes(image, generate(union_pipe, controlnet_inputs=[ControlNetInput(image=control)]), by=1.0)


# ---------------------------------------------------------------- InstantX Inpainting, inpainting


@pytest.fixture(scope="module")
def inpaint_pipe(models):
    return ours_from(models, "inpaint", vae="vae_mean")


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_inpainting_controlnet_matches_diffusers(models, inpaint_pipe, cfg_scale):
    reference = diffusers_pipe(models, "QwenImageControlNetInpaintPipeline", controlnet=models.inpaint,
                               vae=models.vae)
    photo, mask = picture(4), mask_picture((32, 32))  # the mask resized as diffusers does
    expected = reference_call(reference, cfg_scale, control_image=photo, control_mask=mask,
                              controlnet_conditioning_scale=0.9)
    image = generate(inpaint_pipe, cfg_scale,
                     controlnet_inputs=[ControlNetInput(image=photo, inpaint_mask=mask, scale=0.9)])
    assert_same_image(image, expected)
    assert_changes(image, generate(inpaint_pipe, cfg_scale))
    # inpaint_image is the picture to repaint where both are given
    again = generate(inpaint_pipe, cfg_scale, controlnet_inputs=[
        ControlNetInput(image=picture(9), inpaint_image=photo, inpaint_mask=mask, scale=0.9)])
    assert np.array_equal(pixels(again), pixels(image))


@pytest.mark.parametrize("strength", [0.8, 1.0])
def test_inpainting_without_controlnet_matches_diffusers(models, union_pipe, strength):
    """QwenImageInpaintPipeline: the kept region re-noised from the picture after every step."""
    reference = diffusers_pipe(models, "QwenImageInpaintPipeline")
    photo, mask = picture(5, (80, 48)), mask_picture((32, 32))  # both resized to 64x64
    expected = reference(PROMPT, negative_prompt=" ", true_cfg_scale=4.0, image=photo, mask_image=mask,
                         strength=strength, num_inference_steps=5, generator=torch.Generator("cpu").manual_seed(3),
                         **SIZE).images[0]
    call = dict(prompt=PROMPT, negative_prompt=" ", cfg_scale=4.0, seed=3, num_inference_steps=5, progress_bar=False,
                input_image=photo, denoising_strength=strength, **SIZE)
    image = union_pipe(**call, inpaint_mask=mask)
    assert_same_image(image, expected)
    assert_changes(image, union_pipe(**call))  # image-to-image without the mask
    assert union_pipe.timings["denoise_steps"] == int(5 * strength)
    blurred = union_pipe(**call, inpaint_mask=mask, inpaint_blur_size=2, inpaint_blur_sigma=1.0)
    assert_changes(blurred, image, by=0.5)


# ---------------------------------------------------------------- several nets, loading


def test_union_and_inpainting_nets_loaded_together_by_local_paths(models, inpaint_pipe):
    """ids 0 and 1 are the nets' positions among the ControlNet files given: each input acts
    through its own net (the same image as that net loaded alone), both together differ from each."""
    from diffusers import QwenImageControlNetPipeline

    both = ours_from(models, "union", "inpaint", vae="vae_mean")
    swapped = ours_from(models, "inpaint", "union", vae="vae_mean")
    assert [type(n).__name__ for n in both.controlnets] == ["QwenImageControlNet"] * 2
    assert [n.inpaint for n in both.controlnets] == [False, True]
    control, photo, mask = picture(6), picture(7), mask_picture()
    union_input = ControlNetInput(controlnet_id=0, image=control, scale=0.8)
    inpaint_input = ControlNetInput(controlnet_id=1, image=photo, inpaint_mask=mask, scale=0.9)
    reference = diffusers_pipe(models, "QwenImageControlNetPipeline", controlnet=models.union, vae=models.vae)
    assert isinstance(reference, QwenImageControlNetPipeline)
    union_only = generate(both, controlnet_inputs=[union_input])
    assert_same_image(union_only, reference_call(reference, control_image=control, controlnet_conditioning_scale=0.8))
    inpaint_only = generate(both, controlnet_inputs=[inpaint_input])
    assert np.array_equal(pixels(inpaint_only), pixels(generate(inpaint_pipe, controlnet_inputs=[
        ControlNetInput(image=photo, inpaint_mask=mask, scale=0.9)])))
    together = generate(both, blockwise_controlnet_inputs=[union_input, inpaint_input])  # DiffSynth's name
    assert_changes(together, union_only)
    assert_changes(together, inpaint_only)
    ids_swapped = [ControlNetInput(controlnet_id=1, image=control, scale=0.8),
                   ControlNetInput(controlnet_id=0, image=photo, inpaint_mask=mask, scale=0.9)]
    assert np.array_equal(pixels(generate(swapped, controlnet_inputs=ids_swapped)), pixels(together))


def test_a_controlnet_of_another_width_is_refused_at_load_naming_both_files(models, tmp_path):
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    wide = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=3,
                                       joint_attention_dim=TINY_TEXT_HIDDEN, axes_dims_rope=(4, 14, 14))
    net = QwenImageControlNetModel.from_transformer(wide, num_layers=1, attention_head_dim=32, num_attention_heads=3)
    randomize_(net, seed=1).save_pretrained(tmp_path / "cn")
    with pytest.raises(ValueError, match="ControlNet .* is 96 wide .* but the DiT .* is 64") as error:
        QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=models.out / "transformer"), ModelConfig(path=tmp_path / "cn")])
    assert str(tmp_path / "cn") in str(error.value) and str(models.out / "transformer") in str(error.value)


PUBLISHED = {  # InstantX's config.json, num_layers and extra_condition_channels as the brief states them
    "InstantX/Qwen-Image-ControlNet-Union": dict(num_layers=5, extra_condition_channels=0),
    "InstantX/Qwen-Image-ControlNet-Inpainting": dict(num_layers=6, extra_condition_channels=4),
}


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_the_published_key_layout_is_recognised_on_meta(model_id):
    """The full-size nets' keys and shapes (diffusers' model built on the meta device from the published
    config): our class owns every key, builds the same shapes, and is the one candidate of the pipeline
    that owns them all."""
    from diffusers import QwenImageControlNetModel

    from pipelines.core.loader import parameters_on_meta
    from pipelines.models.qwen_image_controlnet import QwenImageControlNet

    config = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=3584, axes_dims_rope=[16, 56, 56], **PUBLISHED[model_id])
    with torch.device("meta"):
        reference = QwenImageControlNetModel(**config)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    owners = [c for c in (*QwenImagePipeline.components.values(), *QwenImagePipeline.component_lists["controlnets"])
              if all(c.owns_checkpoint_key(k) for k in shapes)]
    assert owners == [QwenImageControlNet]
    for with_config in (config, None):
        with parameters_on_meta():
            ours = QwenImageControlNet.from_checkpoint(shapes, with_config)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
        assert ours.inpaint == (config["extra_condition_channels"] > 0)
    assert not any(QwenImageControlNet.owns_checkpoint_key(k) for k in (
        "norm_out.linear.weight", "proj_out.weight", "controlnet_blocks.0.input_proj.weight",
        "controlnet_blocks.0.x_rms.weight"))  # the DiT's and DiffSynth's Blockwise nets' keys


# ---------------------------------------------------------------- VRAM management, LoRA


@pytest.mark.parametrize("preset", ["fp8", "disk"])
def test_vram_managed_controlnet_computes_on_the_dit_stage_exactly(models, tmp_path, preset):
    """A preset of conf/vram (as on a CPU run; disk: weights left in the files, vram_limit auto) on
    the DiT and the ControlNet: the image is bit for bit the unmanaged pipeline's on the weights
    rounded as the storage rounds them (tests/test_vram.py's oracle), and the net is onloaded with
    the DiT, offloaded after."""
    from pipelines.core import vram
    from tests.test_vram import PRESETS, round_as_stored

    keys, limit, storage = PRESETS[preset]
    rounded = tmp_path / "rounded"
    for name in ("transformer", "union"):
        shutil.copytree(models.out / name, rounded / name)
        for file in (rounded / name).glob("*.safetensors"):
            state = load_file(str(file))
            save_file({k: round_as_stored(v, storage) for k, v in state.items()}, str(file), metadata={"format": "pt"})
    common = [ModelConfig(path=models.root / "text_encoder"), ModelConfig(path=models.root / "vae")]
    tokenizer = ModelConfig(path=models.root / "tokenizer")
    oracle = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=tokenizer,
        model_configs=[ModelConfig(path=rounded / "transformer"), *common, ModelConfig(path=rounded / "union")])
    managed = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=tokenizer, vram_limit=limit,
        model_configs=[ModelConfig(path=models.out / "transformer", **keys), *common,
                       ModelConfig(path=models.out / "union", **keys)])
    assert set(managed.vram) == {"dit", "controlnets.0"}
    states = []
    managed.controlnets[0].register_forward_pre_hook(
        lambda module, args: states.append((managed.vram["dit"].state, managed.vram["controlnets.0"].state)))
    inputs = [ControlNetInput(image=picture(8), scale=0.8)]
    image = generate(managed, controlnet_inputs=inputs)
    assert states and set(states) == {(vram.ONLOAD, vram.ONLOAD)}
    assert managed.vram["controlnets.0"].state == vram.OFFLOAD
    expected = generate(oracle, controlnet_inputs=inputs)
    assert_real_image(pixels(expected))
    assert np.array_equal(pixels(image), pixels(expected))


def test_lora_on_the_dit_with_a_controlnet_matches_diffusers(models, union_pipe, tmp_path):
    """A LoRA on the DiT (cold) with the Union net: diffusers' ControlNet pipeline with the same LoRA
    file loaded on its transformer; the net's weights are untouched and come back after clear_lora."""
    from pipelines.demo.lora import write_dit_lora

    shapes = {k: tuple(v.shape) for k, v in models.transformer.state_dict().items()}
    path = write_dit_lora(tmp_path / "lora.safetensors", shapes)
    reference = diffusers_pipe(models, "QwenImageControlNetPipeline", controlnet=models.union)
    reference.transformer = copy.deepcopy(models.transformer)
    reference.load_lora_weights(str(path), adapter_name="tiny")
    control = picture(10)
    expected = reference_call(reference, control_image=control, controlnet_conditioning_scale=0.8)
    inputs = [ControlNetInput(image=control, scale=0.8)]
    without_lora = generate(union_pipe, controlnet_inputs=inputs)
    net_before = {k: v.clone() for k, v in union_pipe.controlnets[0].state_dict().items()}
    union_pipe.load_lora(union_pipe.dit, ModelConfig(path=path))
    try:
        image = generate(union_pipe, controlnet_inputs=inputs)
        assert all(torch.equal(v, net_before[k]) for k, v in union_pipe.controlnets[0].state_dict().items())
    finally:
        union_pipe.clear_lora()
    assert_same_image(image, expected)
    assert_changes(image, without_lora)
    assert np.array_equal(pixels(generate(union_pipe, controlnet_inputs=inputs)), pixels(without_lora))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,message", [
    (dict(controlnet_inputs=[ControlNetInput(image=None)]), r"controlnet_inputs\[0\] has no picture"),
    (dict(controlnet_inputs=[ControlNetInput(image="/nonexistent/edges.png")]), r"controlnet_inputs\[0\]\.image"),
    (dict(controlnet_inputs=[ControlNetInput(image=Image.new("RGB", (8, 8)), start=0.2, end=0.8)]),
     r"start=0.2, end=0.8: DiffSynth's convention .* 0 <= end <= start <= 1"),
    (dict(controlnet_inputs=[ControlNetInput(image=Image.new("RGB", (8, 8)), scale=float("nan"))]),
     r"controlnet_inputs\[0\]\.scale"),
    (dict(controlnet_inputs=[ControlNetInput(image=Image.new("RGB", (8, 8)), controlnet_id=-1)]),
     r"controlnet_id must be an integer >= 0"),
    (dict(controlnet_inputs=[ControlNetInput(image=Image.new("RGB", (8, 8)), processor_id="canny")]),
     r"processor_id='canny': no preprocessor is built in"),
    (dict(controlnet_inputs=[{"image": Image.new("RGB", (8, 8)), "scael": 1.0}]), r"no field 'scael': did you mean"),
    (dict(controlnet_inputs=[], blockwise_controlnet_inputs=[]), "two names for the same argument"),
    (dict(inpaint_mask=Image.new("L", (8, 8))), "inpaint_mask needs input_image"),
    (dict(input_image=Image.new("RGB", (8, 8)), inpaint_mask=Image.new("L", (8, 8)), inpaint_blur_size=2),
     "inpaint_blur_size and inpaint_blur_sigma go together"),
    (dict(input_image=Image.new("RGB", (8, 8)), inpaint_mask=Image.new("L", (8, 8)), inpaint_blur_size=2,
          inpaint_blur_sigma=0.0), "inpaint_blur_sigma must be > 0"),
])
def test_bad_controlnet_and_inpainting_arguments_are_refused_before_any_work(call, message):
    with pytest.raises((SettingError, FileNotFoundError), match=message):  # a missing file: FileNotFoundError
        QwenImagePipeline.check_arguments(dict(prompt="a cat", **call))


@pytest.mark.parametrize("inputs,message", [
    ([ControlNetInput(controlnet_id=1, image=Image.new("RGB", (8, 8)))],
     r"controlnet_id=1, but 1 ControlNet\(s\) are loaded"),
    ([ControlNetInput(image=Image.new("RGB", (8, 8)), inpaint_mask=Image.new("L", (8, 8)))],
     r"takes a control picture \(`image`\) only"),
])
def test_inputs_that_do_not_fit_the_loaded_nets_are_refused(union_pipe, inputs, message):
    with pytest.raises(SettingError, match=message):
        generate(union_pipe, controlnet_inputs=inputs)


def test_an_inpainting_net_without_a_mask_is_refused(inpaint_pipe):
    with pytest.raises(SettingError, match="is an inpainting net: give inpaint_mask"):
        generate(inpaint_pipe, blockwise_controlnet_inputs=[ControlNetInput(image=Image.new("RGB", (8, 8)))])


# ---------------------------------------------------------------- the DiT's hook


def test_the_dit_hook_sees_and_changes_the_generated_tokens_only():
    """With reference pictures (an edit) the hook gets the generated image's tokens after each block
    and its residual lands on them alone: the same as adding it to block 0's output by a torch
    forward hook; None leaves the forward as it is without a hook, bit for bit."""
    from pipelines.demo.checkpoints import random_state_dict
    from pipelines.demo.qwen_image_tiny import DIT
    from pipelines.models.qwen_image_dit import QwenImageDiT

    dit = QwenImageDiT(DIT).eval()
    dit.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in dit.state_dict().items()}, seed=4))
    gen = torch.Generator().manual_seed(0)
    h, w, refs = 4, 3, ((2, 2),)
    latents = torch.randn(1, h * w + 4, 64, generator=gen)
    text = torch.randn(1, 7, DIT.joint_attention_dim, generator=gen)
    residual = torch.randn(1, h * w, DIT.inner_dim, generator=gen)
    seen = []

    def hook(index, image):
        seen.append((index, tuple(image.shape)))
        return residual if index == 0 else None

    with torch.inference_mode():
        plain = dit(latents, torch.tensor([0.6]), text, None, h, w, refs)
        assert torch.equal(dit(latents, torch.tensor([0.6]), text, None, h, w, refs, block_residual=lambda i, x: None),
                           plain)
        out = dit(latents, torch.tensor([0.6]), text, None, h, w, refs, block_residual=hook)
        handle = dit.transformer_blocks[0].register_forward_hook(
            lambda module, args, output: (torch.cat([output[0][:, :h * w] + residual, output[0][:, h * w:]], 1),
                                          output[1]))
        expected = dit(latents, torch.tensor([0.6]), text, None, h, w, refs)
        handle.remove()
    assert seen == [(0, (1, h * w, DIT.inner_dim)), (1, (1, h * w, DIT.inner_dim))]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out - plain).abs().mean() > 1e-2
