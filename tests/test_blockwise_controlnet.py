"""DiffSynth-Studio's Blockwise ControlNet (pipelines/models/qwen_image_blockwise_controlnet.py).

There is no diffusers oracle. The proof instead:
- the key layout of the published checkpoints, written down here from DiffSynth's model definition
  (diffsynth/models/qwen_image_controlnet.py: `img_in` Linear(in_dim + additional_in_dim, dim), 60
  `controlnet_blocks` of x_rms / y_rms (RMSNorm with weight), input_proj, output_proj (Linear(dim, dim));
  diffsynth/configs/model_configs.py: defaults for canny/depth, additional_in_dim=4 for inpaint, no state-dict
  converter), is that of the real files: DiffSynth recognises the files by an MD5 of their sorted key:shape
  list, and the two hashes it publishes come out of this layout (and our module, built on meta, has it);
- the block math against a second, plain float64 implementation written here from DiffSynth's source
  (BlockWiseControlBlock.forward, QwenImageBlockwiseMultiControlNet, the unit that prepares the inputs), on
  tiny random checkpoints in the published layout loaded through our loader;
- scale=0 is an exact zero; the checkpoint contract against the 1.x DiT, the VAE and InstantX's nets.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from pipelines.core.images import pack_latents
from pipelines.core.loader import CheckpointError, load_model, parameters_on_meta
from pipelines.demo import controlnet_tiny
from pipelines.demo.checkpoints import random_state_dict
from pipelines.demo.qwen_image_tiny import DIT, VAE
from pipelines.models.qwen_image_blockwise_controlnet import (
    BlockwiseControlNetParams,
    QwenImageBlockwiseControlNet,
    inpaint_keep_mask,
    mask_control_picture,
)
from pipelines.models.qwen_image_dit import QwenImageDiT
from pipelines.models.qwen_image_vae import QwenImageVAE

CANDIDATES = [QwenImageDiT, QwenImageVAE, QwenImageBlockwiseControlNet]

# diffsynth/configs/model_configs.py: the "model_hash" of the entries for
# DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth (and -Canny) and -Inpaint model.safetensors
PUBLISHED_HASH = {False: "073bce9cf969e317e5662cd570c3e79c", True: "a9e54e480a628f0b956a688a81c33bab"}


def layout(inpaint: bool, num_layers: int = 60, dim: int = 3072) -> dict[str, tuple[int, ...]]:
    """The published file's keys and shapes, from DiffSynth's QwenImageBlockWiseControlNet(num_layers=60,
    in_dim=64, additional_in_dim=0 | 4, dim=3072)."""
    shapes = {"img_in.weight": (dim, 64 + (4 if inpaint else 0)), "img_in.bias": (dim,)}
    for n in range(num_layers):
        shapes |= {f"controlnet_blocks.{n}.x_rms.weight": (dim,), f"controlnet_blocks.{n}.y_rms.weight": (dim,),
                   f"controlnet_blocks.{n}.input_proj.weight": (dim, dim),
                   f"controlnet_blocks.{n}.input_proj.bias": (dim,),
                   f"controlnet_blocks.{n}.output_proj.weight": (dim, dim),
                   f"controlnet_blocks.{n}.output_proj.bias": (dim,)}
    return shapes


def diffsynth_hash(shapes: dict[str, tuple[int, ...]]) -> str:
    """diffsynth/core/loader/file.py hash_model_file: md5 of the sorted 'key:d0_d1' and 'key' entries."""
    entries = sorted([f"{k}:{'_'.join(map(str, v))}" for k, v in shapes.items()] + list(shapes))
    return hashlib.md5(",".join(entries).encode("utf-8")).hexdigest()


def write_checkpoint(folder, shapes: dict[str, tuple[int, ...]], seed: int):
    state = random_state_dict(shapes, seed)
    for key in state:
        if key.endswith("_rms.weight"):  # norm weights near one, as trained ones
            state[key] = 1.0 + state[key]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    return folder, state


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Tiny canny-layout and inpaint-layout checkpoints (3 blocks, 48 wide), the loaded nets, their weights."""
    root = tmp_path_factory.mktemp("blockwise")
    out = {}
    for inpaint in (False, True):
        folder, state = write_checkpoint(root / f"inpaint{inpaint}", layout(inpaint, 3, 48), seed=7 + inpaint)
        out[inpaint] = (load_model([folder], CANDIDATES, torch.float32, "cpu"), state, folder)
    return out


# ----------------------------------------------------------------------------- the published files


@pytest.mark.parametrize("inpaint", [False, True])
def test_the_published_layout_is_the_real_files_and_ours(inpaint):
    shapes = layout(inpaint)
    assert diffsynth_hash(shapes) == PUBLISHED_HASH[inpaint]  # the key list derived above is the real file's
    assert all(QwenImageBlockwiseControlNet.owns_checkpoint_key(k) for k in shapes)
    assert set(QwenImageBlockwiseControlNet.CHECKPOINT_REQUIRED_KEYS) <= shapes.keys()
    with parameters_on_meta():
        net = QwenImageBlockwiseControlNet.from_checkpoint(shapes, None)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == shapes and diffsynth_hash(ours) == PUBLISHED_HASH[inpaint]
    assert net.params == BlockwiseControlNetParams(additional_in_dim=4 if inpaint else 0) and net.inpaint is inpaint
    assert sum(math.prod(s) for s in shapes.values()) * 2 / 1e9 == pytest.approx(2.27, abs=0.01)  # ~2.3 GB in bf16


# ----------------------------------------------------------------------------- the math, in float64


def rms64(x, weight):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def reference_residual(state, block, hidden, control_latents, keep_mask, scale):
    """DiffSynth's Blockwise ControlNet in float64: the control latents (B, 16, 2h, 2w) with the keep-mask
    (B, 1, 2h, 2w) concatenated as channel 16, rearranged 'B C (H P) (W Q) -> B (H W) (C P Q)', through
    img_in; then output_proj(gelu(input_proj(x_rms(hidden) + y_rms(c)))) * scale on the first L tokens."""
    w = {k: v.double() for k, v in state.items()}
    x = control_latents.double() if keep_mask is None else torch.cat([control_latents, keep_mask], 1).double()
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww // 4, c * 4)
    cond = x @ w["img_in.weight"].T + w["img_in.bias"]
    p = f"controlnet_blocks.{block}."
    h = hidden[:, :cond.shape[1]].double()
    y = (rms64(h, w[p + "x_rms.weight"]) + rms64(cond, w[p + "y_rms.weight"])) @ w[p + "input_proj.weight"].T
    y = y + w[p + "input_proj.bias"]
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return (y @ w[p + "output_proj.weight"].T + w[p + "output_proj.bias"]) * scale


def inputs(inpaint: bool, dim: int, seed: int = 0, extra_tokens: int = 0):
    """Latents (1, 16, 8, 12) -> 24 tokens, a hard-and-soft keep-mask, an image stream of a CFG batch of 2."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 12, generator=g)
    keep = (torch.rand(1, 1, 8, 12, generator=g) > 0.4).float() * 0.75 if inpaint else None
    hidden = 3 * torch.randn(2, 24 + extra_tokens, dim, generator=g)
    return latents, keep, hidden


@pytest.mark.parametrize("inpaint", [False, True])
def test_block_math_matches_a_float64_reimplementation(nets, inpaint):
    net, state, _ = nets[inpaint]
    latents, keep, hidden = inputs(inpaint, 48, seed=int(inpaint), extra_tokens=5)  # 5 tokens of an edit's picture
    condition = net.condition(pack_latents(latents), None if keep is None else pack_latents(keep))
    assert condition.shape == (1, 24, 48)
    for block in range(3):
        for scale in (1.0, 0.6):
            got = net.block_residual(block, hidden, condition, scale)
            expected = reference_residual(state, block, hidden, latents, keep, scale)
            assert got.shape == (2, 24, 48) and got.dtype == torch.float32
            assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert expected.abs().max() > 0.1  # the residual is not negligible


def diffsynth_bf16_residual(state, block, hidden, control_latents, keep_mask, scale):
    """DiffSynth's computation in bfloat16 as its code runs it: everything in bf16, its RMSNorm rounding twice
    (`x * rsqrt(mean(x.float()**2) + eps)` back to bf16, then times the bf16 weight)."""
    w = {k: v.bfloat16() for k, v in state.items()}

    def rms(x, weight):
        return (x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight

    x = torch.cat([control_latents, keep_mask], 1).bfloat16()
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww // 4, c * 4)
    cond = F.linear(x, w["img_in.weight"], w["img_in.bias"])
    p = f"controlnet_blocks.{block}."
    h = hidden.bfloat16()
    y = F.linear(rms(h, w[p + "x_rms.weight"]) + rms(cond, w[p + "y_rms.weight"]), w[p + "input_proj.weight"],
                 w[p + "input_proj.bias"])
    return F.linear(F.gelu(y), w[p + "output_proj.weight"], w[p + "output_proj.bias"]) * scale


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bf16_computes_in_bf16_with_diffsynths_roundings(nets, device):
    _, state, folder = nets[True]
    net = load_model([folder], CANDIDATES, torch.bfloat16, device)
    latents, keep, hidden = inputs(True, 48, seed=3)
    # float32 inputs, cast by the net
    condition = net.condition(pack_latents(latents).to(device), pack_latents(keep).to(device))
    got = net.block_residual(1, hidden.bfloat16().to(device), condition, 0.6).cpu()
    assert condition.dtype == got.dtype == torch.bfloat16
    expected = reference_residual(state, 1, hidden, latents, keep, 0.6)
    assert (got.double() - expected).abs().max() <= 0.03 * expected.abs().max()
    # bit for bit as DiffSynth's bf16 code on the same device (one rounding in the norms instead of two changes
    # about half the values; 2% allowed for kernels that sum in another order)
    theirs = diffsynth_bf16_residual({k: v.to(device) for k, v in state.items()}, 1, hidden.to(device),
                                     latents.to(device), keep.to(device), 0.6)
    assert (got != theirs.cpu()).float().mean() < 0.02


def test_scale_zero_is_an_exact_zero(nets):
    net, _, _ = nets[False]
    latents, _, hidden = inputs(False, 48)
    condition = net.condition(pack_latents(latents))
    zero = net.block_residual(2, hidden, condition, 0.0)
    assert zero.shape == (2, 24, 48) and not zero.any()
    assert torch.equal(hidden + zero, hidden)
    assert net.block_residual(2, hidden, condition, 1.0).abs().min() > 0


def test_the_inpaint_inputs_are_diffsynths():
    """mask_control_picture / inpaint_keep_mask against DiffSynth's unit written out on PIL pictures
    (apply_controlnet_mask_on_image, apply_controlnet_mask_on_latents)."""
    g = np.random.default_rng(0)
    picture = Image.fromarray(g.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    mask = Image.fromarray(g.choice(np.array([0, 100, 127, 128, 200, 255], np.uint8), (32, 48, 3)))
    preprocess = lambda im: torch.tensor(np.array(im, np.float32)) * (2 / 255) - 1  # noqa: E731 (H, W, C)

    blacked = np.array(picture)
    blacked[preprocess(mask).mean(-1).numpy() > 0] = 0
    expected_picture = preprocess(Image.fromarray(blacked)).permute(2, 0, 1)[None]
    expected_keep = 1 - torch.nn.functional.interpolate(
        ((preprocess(mask) + 1) / 2).mean(-1)[None, None], size=(4, 6))

    mask01 = torch.tensor(np.array(mask, np.float32) / 255).permute(2, 0, 1)[None]
    got = mask_control_picture(preprocess(picture).permute(2, 0, 1)[None], mask01)
    torch.testing.assert_close(got, expected_picture, rtol=0, atol=1e-6)
    torch.testing.assert_close(inpaint_keep_mask(mask01, 4, 6), expected_keep, rtol=0, atol=1e-6)
    assert 0 < (got == -1).float().mean() < 1 and expected_keep.unique().numel() > 2  # soft values kept


def test_wrong_inputs_are_named(nets):
    canny, inpaint = nets[False][0], nets[True][0]
    latents, keep, hidden = inputs(True, 48)
    with pytest.raises(ValueError, match="not the inpaint variant"):
        canny.condition(pack_latents(latents), pack_latents(keep))
    with pytest.raises(ValueError, match="needs an inpaint mask"):
        inpaint.condition(pack_latents(latents))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 64\)"):
        canny.condition(torch.zeros(1, 24, 68))
    condition = canny.condition(pack_latents(latents))
    with pytest.raises(ValueError, match="the generated image's size"):
        canny.block_residual(0, hidden[:, :20], condition)
    with pytest.raises(ValueError, match="48 wide with 3 blocks, the DiT 64 wide with 3 blocks"):
        canny.check_fits(64, 3)
    canny.check_fits(48, 3)


# ----------------------------------------------------------------------------- the checkpoint contract


def _tiny_checkpoint(folder, build, seed):
    with parameters_on_meta():
        shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    folder.mkdir(parents=True)
    save_file(random_state_dict(shapes, seed), str(folder / "model.safetensors"))
    return folder


def test_recognised_among_the_dit_and_vae_and_not_claimed_by_them(nets, tmp_path):
    for inpaint in (False, True):
        net, _, folder = nets[inpaint]
        assert type(net) is QwenImageBlockwiseControlNet and net.inpaint is inpaint
        for candidates in (CANDIDATES, CANDIDATES[::-1]):
            assert type(load_model([folder], candidates, torch.float32, "cpu")) is QwenImageBlockwiseControlNet
        for other, said in ((QwenImageDiT, "not a QwenImageDiT checkpoint"), (QwenImageVAE, "unknown checkpoint")):
            with pytest.raises(CheckpointError, match=said):
                load_model([folder], [other], torch.float32, "cpu")
    dit = _tiny_checkpoint(tmp_path / "dit", lambda: QwenImageDiT(DIT), 1)
    vae = _tiny_checkpoint(tmp_path / "vae", lambda: QwenImageVAE(VAE), 2)
    for folder, cls in ((dit, QwenImageDiT), (vae, QwenImageVAE)):
        for candidates in (CANDIDATES, CANDIDATES[::-1]):
            assert type(load_model([folder], candidates, torch.float32, "cpu")) is cls
        with pytest.raises(CheckpointError, match="not a QwenImageBlockwiseControlNet checkpoint|unknown checkpoint"):
            load_model([folder], [QwenImageBlockwiseControlNet], torch.float32, "cpu")


def test_instantx_controlnet_keys_are_not_ours():
    diffusers = pytest.importorskip("diffusers")
    for extra in (0, 4):  # Union; Inpainting (extra_condition_channels=4)
        with torch.device("meta"):
            instantx = diffusers.QwenImageControlNetModel(
                num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                axes_dims_rope=(4, 6, 6), extra_condition_channels=extra)
        keys = set(instantx.state_dict())
        assert {k for k in keys if QwenImageBlockwiseControlNet.owns_checkpoint_key(k)} == {"img_in.weight",
                                                                                             "img_in.bias"}
        assert "controlnet_blocks.0.weight" in keys  # the name both families use, for another layer


def test_a_bad_file_is_named(tmp_path):
    shapes = layout(False, 3, 48)
    del shapes["controlnet_blocks.1.x_rms.weight"], shapes["controlnet_blocks.1.y_rms.weight"]
    del shapes["controlnet_blocks.1.input_proj.weight"], shapes["controlnet_blocks.1.input_proj.bias"]
    del shapes["controlnet_blocks.1.output_proj.weight"], shapes["controlnet_blocks.1.output_proj.bias"]
    folder, _ = write_checkpoint(tmp_path / "gap", shapes, 0)
    with pytest.raises(CheckpointError, match=r"gap.*not 0\.\.N-1 \(missing \[1\]\)"):
        load_model([folder], CANDIDATES, torch.float32, "cpu")
    shapes = layout(False, 2, 48)
    shapes["img_in.weight"] = (48, 66)
    folder, _ = write_checkpoint(tmp_path / "channels", shapes, 0)
    with pytest.raises(CheckpointError, match=r"channels.*takes 66 channels.*64.*or 68"):
        load_model([folder], CANDIDATES, torch.float32, "cpu")


# ----------------------------------------------------------------------------- the demo


def test_the_demo_net_fits_the_tiny_dit_and_its_picture_is_an_edge_map(tmp_path):
    for inpaint, builder in ((False, controlnet_tiny.build), (True, controlnet_tiny.build_inpaint)):
        path = builder(tmp_path / "tiny" / f"model{inpaint}.safetensors")
        net = load_model([path], CANDIDATES, torch.float32, "cpu")
        assert type(net) is QwenImageBlockwiseControlNet and net.inpaint is inpaint
        net.check_fits(DIT.inner_dim, DIT.num_layers)
        latents, keep, hidden = inputs(inpaint, DIT.inner_dim)
        condition = net.condition(pack_latents(latents), None if keep is None else pack_latents(keep))
        assert net.block_residual(DIT.num_layers - 1, hidden, condition).std() > 0.1
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["modelFalse.safetensors", "modelTrue.safetensors"]

    picture_path = controlnet_tiny.build_control_picture(tmp_path / "edges.png")
    picture = np.array(Image.open(picture_path))
    assert picture.shape == (128, 128, 3) and set(np.unique(picture)) == {0, 255}
    assert 0.02 < (picture == 255).mean() < 0.2  # thin outlines on black


# ----------------------------------------------------------------------------- in the pipeline
# The tiny demo model (tests/conftest.py `tiny_repo`: a DiT of 2 blocks, 64 wide) with the demo's Blockwise
# nets (pipelines/demo/controlnet_tiny.py) loaded as one more ModelConfig each; 64x64 pictures, 4 steps.

PROMPT = "a house by a lake, pencil sketch"
SIZE = dict(height=64, width=64)
STEPS = 4


def tiny_pipe(repo, *nets, **kwargs):
    from pipelines.qwen_image import ModelConfig, QwenImagePipeline

    configs = [ModelConfig(path=repo / "transformer"), ModelConfig(path=repo / "text_encoder"),
               ModelConfig(path=repo / "vae")] + [ModelConfig(path=net) for net in nets]
    return QwenImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             tokenizer_config=ModelConfig(path=repo / "tokenizer"), **kwargs)


def run(pipe, cfg_scale: float = 4.0, **call) -> np.ndarray:
    image = pipe(PROMPT, negative_prompt=" ", cfg_scale=cfg_scale, seed=3, num_inference_steps=STEPS,
                 progress_bar=False, **SIZE, **call)
    return np.asarray(image, dtype=np.int16)


def assert_changes(a: np.ndarray, b: np.ndarray, by: float = 3.0) -> None:
    assert np.abs(a - b).mean() > by, f"mean pixel difference {np.abs(a - b).mean():.2f}: no visible effect"


def smooth_picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def soft_mask(size: int = 64) -> Image.Image:
    """White (repaint) on the right half, grey levels 100 / 200 in two corners (DiffSynth keeps them soft)."""
    array = np.zeros((size, size), np.uint8)
    array[:, size // 2:] = 255
    array[: size // 8, : size // 8] = 100
    array[-size // 8:, : size // 8] = 200
    return Image.fromarray(array)


def write_instantx(folder, seed: int = 5):
    """A one-block InstantX Union net for the tiny DiT (our class on meta, random weights, its config.json)."""
    import json

    from pipelines.models.qwen_image_controlnet import QwenImageControlNet, QwenImageControlNetParams

    params = QwenImageControlNetParams(num_layers=1, attention_head_dim=DIT.attention_head_dim,
                                       num_attention_heads=DIT.num_attention_heads,
                                       joint_attention_dim=DIT.joint_attention_dim, axes_dims_rope=DIT.axes_dims_rope)
    with parameters_on_meta():
        shapes = {k: tuple(v.shape) for k, v in QwenImageControlNet(params).state_dict().items()}
    folder.mkdir(parents=True)
    save_file(random_state_dict(shapes, seed), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"axes_dims_rope": list(DIT.axes_dims_rope)}))
    return folder


@pytest.fixture(scope="module")
def demo_nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise_pipe")
    return dict(canny=controlnet_tiny.build(root / "canny.safetensors"),
                inpaint=controlnet_tiny.build_inpaint(root / "inpaint.safetensors"),
                instantx=write_instantx(root / "instantx"))


@pytest.fixture(scope="module")
def canny_pipe(tiny_repo, demo_nets):
    return tiny_pipe(tiny_repo, demo_nets["canny"])


def test_blockwise_scale_zero_is_the_plain_image_and_a_scale_changes_it(canny_pipe):
    from pipelines import ControlNetInput

    edges = controlnet_tiny.control_picture(64)
    assert type(canny_pipe.controlnets[0]) is QwenImageBlockwiseControlNet
    plain = run(canny_pipe)
    zero = run(canny_pipe, controlnet_inputs=[ControlNetInput(image=edges, scale=0.0)])
    assert np.array_equal(zero, plain)  # bit for bit: the condition draws no random number, adds exact zeros
    full = run(canny_pipe, blockwise_controlnet_inputs=[ControlNetInput(image=edges)])  # DiffSynth's name
    half = run(canny_pipe, controlnet_inputs=[ControlNetInput(image=edges, scale=0.5)])
    assert_changes(full, plain)
    assert_changes(half, plain, by=1.0)
    assert_changes(full, half, by=1.0)
    other = run(canny_pipe, controlnet_inputs=[ControlNetInput(image=smooth_picture(1))])
    assert_changes(other, full)  # the picture matters, not only that a net is there


def test_blockwise_start_end_are_the_steps_its_blocks_run(canny_pipe):
    """DiffSynth's rule over 4 steps (positions 1, 2/3, 1/3, 0): start=0.7, end=0.3 acts at steps 1 and 2, the
    net's blocks run there and nowhere else (cfg_scale=1: one DiT forward a step); a window that covers no step
    and scale=0 run no block and give the plain image."""
    from pipelines import ControlNetInput

    net, edges = canny_pipe.controlnets[0], controlnet_tiny.control_picture(64)
    events: list[str] = []
    handles = [canny_pipe.dit.register_forward_pre_hook(lambda module, args: events.append("dit")),
               net.controlnet_blocks[0].register_forward_hook(lambda module, args, out: events.append("net"))]

    def steps_with_blocks(**control) -> tuple[set[int], np.ndarray]:
        events.clear()
        image = run(canny_pipe, cfg_scale=1.0, controlnet_inputs=[ControlNetInput(image=edges, **control)])
        assert events.count("dit") == STEPS
        steps, step = set(), -1
        for event in events:
            step += event == "dit"
            if event == "net":
                steps.add(step)
        return steps, image

    try:
        assert steps_with_blocks()[0] == {0, 1, 2, 3}
        window, windowed = steps_with_blocks(start=0.7, end=0.3)
        assert window == {1, 2}
        assert steps_with_blocks(start=1.0, end=0.9)[0] == {0}
        nowhere, nowhere_image = steps_with_blocks(start=0.6, end=0.4)
        zero, zero_image = steps_with_blocks(scale=0.0)
    finally:
        for handle in handles:
            handle.remove()
    plain = run(canny_pipe, cfg_scale=1.0)
    assert nowhere == zero == set() and np.array_equal(nowhere_image, plain) and np.array_equal(zero_image, plain)
    assert_changes(windowed, plain, by=1.0)
    assert_changes(windowed, run(canny_pipe, cfg_scale=1.0, controlnet_inputs=[ControlNetInput(image=edges)]), by=1.0)


def test_blockwise_inpaint_net_reads_diffsynths_masked_picture_and_soft_keep_mask(tiny_repo, demo_nets):
    """What the -Inpaint net's img_in reads, against DiffSynth's unit written out on the PIL pictures
    (apply_controlnet_mask_on_image, VAE encode, apply_controlnet_mask_on_latents, rearrange); the mask repaints."""
    from pipelines import ControlNetInput, SettingError

    pipe = tiny_pipe(tiny_repo, demo_nets["inpaint"])
    net = pipe.controlnets[0]
    assert net.inpaint
    photo, mask = smooth_picture(2), soft_mask()
    seen = []
    handle = net.img_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        image = run(pipe, controlnet_inputs=[ControlNetInput(image=photo, inpaint_mask=mask)])
    finally:
        handle.remove()

    def preprocess(picture):  # DiffSynth's preprocess_image: (1, 3, H, W) in [-1, 1]
        return torch.tensor(np.array(picture.convert("RGB"), np.float32)).permute(2, 0, 1)[None] * (2 / 255) - 1

    blacked = np.array(photo)
    blacked[preprocess(mask)[0].mean(0).numpy() > 0] = 0
    with torch.no_grad():
        latents = pipe.vae.encode(preprocess(Image.fromarray(blacked)))
    keep = 1 - F.interpolate(((preprocess(mask) + 1) / 2).mean(1, keepdim=True), size=latents.shape[-2:])
    expected = pack_latents(torch.cat([latents, keep], dim=1))
    assert len(seen) == 1 and seen[0].shape == expected.shape == (1, 16, 68)  # once a call, not once a step
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-5)
    assert keep.unique().numel() > 2  # soft values reach the net
    plain = run(pipe)
    assert_changes(image, plain)
    assert_changes(image, run(pipe, controlnet_inputs=[ControlNetInput(image=photo, inpaint_mask=mask.rotate(90))]),
                   by=1.0)
    with pytest.raises(SettingError, match="is an inpainting net: give inpaint_mask"):
        run(pipe, controlnet_inputs=[ControlNetInput(image=photo)])


def test_blockwise_and_instantx_nets_loaded_together(tiny_repo, demo_nets, canny_pipe):
    """ids are the nets' positions among the ControlNet files: each input acts through its own net (the
    Blockwise input alone gives the image of the Blockwise net loaded alone), both together differ from each,
    and loading them the other way round with the ids swapped gives the same image."""
    from pipelines import ControlNetInput, SettingError

    both = tiny_pipe(tiny_repo, demo_nets["instantx"], demo_nets["canny"])
    swapped = tiny_pipe(tiny_repo, demo_nets["canny"], demo_nets["instantx"])
    assert [type(n).__name__ for n in both.controlnets] == ["QwenImageControlNet", "QwenImageBlockwiseControlNet"]
    assert set(both.sources) >= {"controlnets.0", "controlnets.1"}
    edges, depth = controlnet_tiny.control_picture(64), smooth_picture(4)
    blockwise_input = ControlNetInput(controlnet_id=1, image=edges, scale=0.8)
    instantx_input = ControlNetInput(controlnet_id=0, image=depth, scale=0.9)
    blockwise_only = run(both, controlnet_inputs=[blockwise_input])
    assert np.array_equal(blockwise_only, run(canny_pipe, controlnet_inputs=[
        ControlNetInput(image=edges, scale=0.8)]))
    instantx_only = run(both, controlnet_inputs=[instantx_input])
    together = run(both, controlnet_inputs=[instantx_input, blockwise_input])
    assert_changes(together, blockwise_only, by=1.0)
    assert_changes(together, instantx_only, by=1.0)
    ids_swapped = [ControlNetInput(controlnet_id=1, image=depth, scale=0.9),
                   ControlNetInput(controlnet_id=0, image=edges, scale=0.8)]
    assert np.array_equal(run(swapped, controlnet_inputs=ids_swapped), together)
    with pytest.raises(SettingError, match=r"ControlNet 1 \(QwenImageBlockwiseControlNet\) takes a control picture"):
        run(both, controlnet_inputs=[ControlNetInput(controlnet_id=1, image=edges, inpaint_mask=soft_mask())])


def test_a_blockwise_net_for_another_dit_is_refused_at_load_naming_both_files(tiny_repo, tmp_path):
    shapes = layout(False, DIT.num_layers + 1, DIT.inner_dim)
    folder, _ = write_checkpoint(tmp_path / "three_blocks", shapes, 0)
    with pytest.raises(ValueError, match=r"does not fit the DiT .*64 wide with 3 blocks, the DiT 64 wide with 2") as e:
        tiny_pipe(tiny_repo, folder)
    assert str(folder) in str(e.value) and str(tiny_repo / "transformer") in str(e.value)


def test_vram_managed_blockwise_net_computes_on_the_dit_stage_exactly(tiny_repo, demo_nets, tmp_path):
    """conf/vram's fp8 preset (as on a CPU run) on the DiT and the Blockwise net: the image is bit for bit the
    unmanaged pipeline's on the weights rounded as the storage rounds them (tests/test_vram.py's oracle), and the
    net computes while the DiT's stage is onloaded, offloaded after."""
    import shutil

    from safetensors.torch import load_file

    from pipelines import ControlNetInput
    from pipelines.core import vram
    from pipelines.qwen_image import ModelConfig, QwenImagePipeline
    from tests.test_vram import PRESETS, round_as_stored

    keys, limit, storage = PRESETS["fp8"]

    def rounded(path, target):
        shutil.copytree(path, target) if path.is_dir() else shutil.copyfile(path, target)
        for file in [target] if target.is_file() else target.glob("*.safetensors"):
            state = load_file(str(file))
            save_file({k: round_as_stored(v, storage) for k, v in state.items()}, str(file), metadata={"format": "pt"})
        return target

    common = [ModelConfig(path=tiny_repo / "text_encoder"), ModelConfig(path=tiny_repo / "vae")]
    tokenizer = ModelConfig(path=tiny_repo / "tokenizer")
    oracle = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=tokenizer, model_configs=[
            ModelConfig(path=rounded(tiny_repo / "transformer", tmp_path / "dit")), *common,
            ModelConfig(path=rounded(demo_nets["canny"], tmp_path / "canny.safetensors"))])
    managed = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", tokenizer_config=tokenizer, vram_limit=limit, model_configs=[
            ModelConfig(path=tiny_repo / "transformer", **keys), *common, ModelConfig(path=demo_nets["canny"], **keys)])
    assert set(managed.vram) == {"dit", "controlnets.0"}
    states = []
    managed.controlnets[0].controlnet_blocks[1].register_forward_pre_hook(
        lambda module, args: states.append((managed.vram["dit"].state, managed.vram["controlnets.0"].state)))
    inputs = [ControlNetInput(image=controlnet_tiny.control_picture(64), scale=0.8)]
    image = run(managed, controlnet_inputs=inputs)
    assert states and set(states) == {(vram.ONLOAD, vram.ONLOAD)}
    assert managed.vram["controlnets.0"].state == vram.OFFLOAD
    expected = run(oracle, controlnet_inputs=inputs)
    assert np.array_equal(image, expected)
    assert_changes(expected, run(oracle), by=1.0)
