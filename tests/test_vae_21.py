"""Qwen-Image 2.1 VAE: parity with diffusers' AutoencoderKLQwenImage21 on tiny random checkpoints written
by diffusers' save_pretrained and loaded through our loader; the full-size layout on the meta device; a 1.x
VAE file and a 2.1 VAE file told apart."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.loader import CheckpointError, load_model
from pipelines.models.qwen_image_21_vae import LATENTS_MEAN, LATENTS_STD, QwenImage21VAE, QwenImage21VAEParams
from pipelines.models.qwen_image_vae import QwenImageVAE
from tests.support.weights import randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402

# The published layout in small: five stages (16x), temporal stages 1-3, a wider decoder, z_dim 64 (so the
# published latent statistics apply and no config is needed).
CONFIG_A = dict(base_dim=8, decoder_base_dim=12, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1,
                temperal_downsample=[False, True, True, True])
# Another shape: three stages (4x), a temporal first stage, decoder_base_dim None, its own latent statistics.
CONFIG_B = dict(base_dim=4, decoder_base_dim=None, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=2,
                temperal_downsample=[True, False], latents_mean=[0.3, -0.2, 0.5, -0.7, 1.1, 0.0, -1.3, 0.8],
                latents_std=[1.5, 0.8, 2.2, 1.1, 0.9, 1.7, 3.0, 1.2])


def _write(tmp_path_factory, cls, config: dict, seed: int):
    reference = randomize_(cls(**config), seed).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "vae"
    reference.save_pretrained(folder)
    return reference, folder


@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory):
    reference, folder = _write(tmp_path_factory, diffusers.AutoencoderKLQwenImage21, CONFIG_A, seed=1)
    return reference, load_model([folder], [QwenImage21VAE], torch.float32, "cpu"), folder


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    reference, folder = _write(tmp_path_factory, diffusers.AutoencoderKLQwenImage21, CONFIG_B, seed=2)
    return reference, load_model([folder], [QwenImage21VAE], torch.float32, "cpu"), folder


def _pictures(size: tuple[int, int], count: int) -> list[Image.Image]:
    """RGBA pictures with real transparency (alpha from 0 to 255), smooth enough to look like pictures."""
    g = np.random.default_rng(5)
    w, h = size
    pictures = []
    for _ in range(count):
        coarse = g.random((4, 4, 4)) * 255
        big = np.asarray(Image.fromarray(coarse.astype(np.uint8), "RGBA").resize((w, h), Image.BILINEAR))
        noisy = np.clip(big.astype(np.float32) + g.normal(0, 20, big.shape), 0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(noisy, "RGBA"))
    return pictures


def _decode_as_the_pipeline(reference, latents: torch.Tensor) -> torch.Tensor:
    """QwenImage21Pipeline.__call__'s decode: (B, z, 1, h, w) * std + mean in the VAE's dtype, decode, frame 0."""
    z, latents = reference.config.z_dim, latents.to(reference.dtype)
    mean = torch.tensor(reference.config.latents_mean).view(1, z, 1, 1, 1).to(latents.dtype)
    std = torch.tensor(reference.config.latents_std).view(1, z, 1, 1, 1).to(latents.dtype)
    with torch.no_grad():
        return reference.decode(latents[:, :, None] * std + mean, return_dict=False)[0][:, :, 0]


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 parity: max |diff| within 1e-5 of the output's scale."""
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("which", ["a", "b"])
def test_encode_matches_the_pipelines_reference_latents(which, ckpt_a, ckpt_b):
    reference, ours, _ = ckpt_a if which == "a" else ckpt_b
    f = ours.params.scale_factor
    width, height = 6 * f, 3 * f  # not square
    processor = VaeImageProcessor(vae_scale_factor=f, vae_latent_channels=reference.config.z_dim)
    # as QwenImage21Pipeline: the RGBA picture, preprocessed to [-1, 1], one picture at a time; here also a batch
    images = torch.cat([processor.preprocess(p, width=width, height=height) for p in _pictures((70, 41), 2)])
    assert images.shape == (2, 4, height, width) and images[:, 3].std() > 0.3  # the alpha varies
    pipeline = SimpleNamespace(vae=reference, latent_channels=reference.config.z_dim)
    with torch.no_grad():
        expected = diffusers.QwenImage21Pipeline._encode_vae_image(pipeline, images[:, :, None], None)[:, :, 0]
    got = ours.encode(images)
    assert got.shape == (2, reference.config.z_dim, 3, 6) and expected.std() > 0.1
    _close(got, expected)
    _close(ours.encode(images[1:]), expected[1:])


@pytest.mark.parametrize("which", ["a", "b"])
def test_decode_matches_the_pipelines_picture(which, ckpt_a, ckpt_b):
    reference, ours, _ = ckpt_a if which == "a" else ckpt_b
    f = ours.params.scale_factor
    latents = torch.randn(2, reference.config.z_dim, 5, 3, generator=torch.Generator().manual_seed(10))
    expected = _decode_as_the_pipeline(reference, latents)
    got = ours.decode(latents)
    assert got.shape == (2, 4, 5 * f, 3 * f)
    assert expected.std() > 0.2 and (expected.abs() < 1).float().mean() > 0.5  # neither flat nor clamped
    _close(got, expected)
    # what the pipeline makes of it: an RGBA picture
    picture = VaeImageProcessor(vae_scale_factor=f).postprocess(got, output_type="pil")[0]
    assert picture.mode == "RGBA" and picture.size == (3 * f, 5 * f)


def test_bf16_weights_compute_in_bf16_and_return_float32(ckpt_a):
    """bfloat16 against float32, with diffusers' own VAE cast to bfloat16 as the yardstick of what the rounding
    gives. Measured mean |diff| to our float32 result: decode 0.0041 (diffusers' 0.0046), encode 0.0014 (0.0018).
    Bound: within 1.25x diffusers'."""
    reference, ours, _ = ckpt_a
    g = torch.Generator().manual_seed(12)
    latents = torch.randn(1, 64, 3, 4, generator=g)
    images = torch.rand(1, 4, 48, 64, generator=g) * 2 - 1
    decoded, encoded = ours.decode(latents), ours.encode(images)
    theirs = copy.deepcopy(reference).to(torch.bfloat16)
    pipeline = SimpleNamespace(vae=theirs, latent_channels=64)
    with torch.no_grad():
        their_decoded = _decode_as_the_pipeline(theirs, latents).float()
        their_encoded = diffusers.QwenImage21Pipeline._encode_vae_image(
            pipeline, images[:, :, None].to(torch.bfloat16), None)[:, :, 0].float()
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    got_decoded, got_encoded = bf16.decode(latents), bf16.encode(images)
    assert got_decoded.dtype == got_encoded.dtype == torch.float32
    for what, got, their, expected in (("decode", got_decoded, their_decoded, decoded),
                                       ("encode", got_encoded, their_encoded, encoded)):
        error, their_error = (got - expected).abs().mean(), (their - expected).abs().mean()
        assert 0 < error <= 1.25 * their_error, f"{what}: mean {error:.5f} (diffusers' bf16: {their_error:.5f})"


# ----------------------------------------------------------------------------- the checkpoint


def test_full_size_layout_on_meta_matches_diffusers():
    with torch.device("meta"):
        reference = diffusers.AutoencoderKLQwenImage21()
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for config in (None, dict(reference.config)):  # the shapes alone tell the architecture
        with torch.device("meta"):
            model = QwenImage21VAE.from_checkpoint(shapes, config)
        assert model.params == QwenImage21VAEParams()
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert model.params.scale_factor == 16 and model.params.z_dim == 64
    assert model.params.latents_mean == LATENTS_MEAN == tuple(reference.config.latents_mean)
    assert model.params.latents_std == LATENTS_STD == tuple(reference.config.latents_std)
    assert all(QwenImage21VAE.owns_checkpoint_key(k) for k in shapes)
    assert set(QwenImage21VAE.CHECKPOINT_REQUIRED_KEYS) <= shapes.keys()


def test_a_1x_and_a_21_vae_are_told_apart(ckpt_a, tmp_path_factory):
    _, _, folder_21 = ckpt_a
    _, folder_1x = _write(tmp_path_factory, diffusers.AutoencoderKLQwenImage, dict(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]), 3)
    for candidates in ([QwenImageVAE, QwenImage21VAE], [QwenImage21VAE, QwenImageVAE]):
        assert type(load_model([folder_1x], candidates, torch.float32, "cpu")) is QwenImageVAE
        assert type(load_model([folder_21], candidates, torch.float32, "cpu")) is QwenImage21VAE
    # named as another model's file (not as an incomplete one), with keys that tell
    for folder, cls, telling in ((folder_1x, QwenImage21VAE, "upsamplers.0."), (folder_21, QwenImageVAE, "upsampler.")):
        with pytest.raises(CheckpointError, match=rf"not a (plain )?{cls.__name__} checkpoint") as error:
            load_model([folder], [cls], torch.float32, "cpu")
        assert telling in str(error.value) and "incomplete" not in str(error.value)

    # the published models' full key sets: each class owns its own, not the other's
    with torch.device("meta"):
        keys_1x = set(diffusers.AutoencoderKLQwenImage(attn_scales=[0.5]).state_dict())  # attention in a stage too
        keys_21 = set(diffusers.AutoencoderKLQwenImage21().state_dict())
    for cls, own, other in ((QwenImageVAE, keys_1x, keys_21), (QwenImage21VAE, keys_21, keys_1x)):
        assert all(cls.owns_checkpoint_key(k) for k in own)
        assert not all(cls.owns_checkpoint_key(k) for k in other)
        assert not set(cls.CHECKPOINT_REQUIRED_KEYS) <= other


def test_config_wins_and_bad_configs_are_named(ckpt_b):
    reference, _, folder = ckpt_b
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    with pytest.raises(ValueError, match="latents_mean has 64 values but z_dim is 8"):
        QwenImage21VAE.from_checkpoint(shapes, None)  # shapes cannot tell the latent statistics
    params = QwenImage21VAE.params_from_checkpoint(shapes, dict(reference.config))
    assert params == QwenImage21VAEParams(**CONFIG_B) and params.decoder_base_dim == 4
    for bad, message in (({"is_residual": False}, "is_residual is false"), ({"patch_size": 2}, "patch_size 2"),
                         ({"dim_mult": [1, 3, 2]}, "encoder stage 1 goes from 4 to 12 channels")):
        with pytest.raises(ValueError, match=message):
            QwenImage21VAE.from_checkpoint(shapes, dict(reference.config, **bad))


def test_bad_inputs_are_reported(ckpt_a):
    vae = ckpt_a[1]
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\) \(RGBA"):
        vae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 4, 40, 32))
    with pytest.raises(ValueError, match=r"latents \(B, 64, h, w\)"):
        vae.decode(torch.zeros(1, 16, 2, 2))


# ----------------------------------------------------------------------------- tiling


def test_tiled_decode_and_encode_are_blends_of_tiles(ckpt_a):
    # two tiles side by side (latent columns 0-3 and 2-5): tile 0, a linear cross-fade over the overlap, tile 1
    vae = ckpt_a[1]
    g = torch.Generator().manual_seed(20)
    latents = torch.randn(1, 64, 4, 6, generator=g)
    got = vae.decode(latents, tiled=True, tile_size=4, tile_stride=2)
    left, right = vae.decode(latents[..., :4]), vae.decode(latents[..., 2:])
    ramp = torch.arange(1, 33, dtype=torch.float32) / 33  # 2 latent pixels = 32 pixels of overlap
    expected = torch.cat([left[..., :32], left[..., 32:] * (1 - ramp) + right[..., :32] * ramp, right[..., 32:]], -1)
    # each tile is clamped, the blend too: compare where neither tile saturates
    pad = torch.zeros(1, 4, 64, 32)
    inside = (torch.cat([left, pad], -1).abs() < 1) & (torch.cat([pad, right], -1).abs() < 1)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(got[inside], expected[inside], atol=1e-5, rtol=0)

    images = torch.rand(1, 4, 64, 96, generator=g) * 2 - 1
    got = vae.encode(images, tiled=True, tile_size=4, tile_stride=2)
    left, right = vae.encode(images[..., :64]), vae.encode(images[..., 32:])
    ramp = torch.arange(1, 3, dtype=torch.float32) / 3
    expected = torch.cat([left[..., :2], left[..., 2:] * (1 - ramp) + right[..., :2] * ramp, right[..., 2:]], -1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(vae.decode(latents, tiled=True, tile_size=6), vae.decode(latents))  # one tile: untiled
