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
