"""Qwen-Image VAE: parity with diffusers' AutoencoderKLQwenImage on tiny random checkpoints
written by diffusers' own save_pretrained, checkpoint inference, and tiling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipelines.models.qwen_image_vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    CausalConv3d,
    QwenImageVAE,
    QwenImageVAEParams,
    tiled_map,
)

diffusers = pytest.importorskip("diffusers")

# The real layout in small: every block kind, z_dim 16 (so the real latents_mean/std apply
# and config=None works), 8x compression.
CONFIG_A = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])
# Another shape: 3 stages (4x), 2 residual blocks, other temporal pattern, own latent stats.
CONFIG_B = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[True, False],
                latents_mean=[0.3, -0.2, 0.5, -0.7], latents_std=[1.5, 0.8, 2.2, 1.1])


def _fill_random(module: torch.nn.Module, seed: int) -> None:
    """Every parameter non-zero: gammas 1 +- noise, biases non-zero, weights ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                fan_in = p.shape[1] * (p.shape[-2] * p.shape[-1] if p.dim() >= 4 else 1)
                p.copy_(r / math.sqrt(fan_in))


def _write_checkpoint(tmp_path_factory, config: dict, seed: int):
    reference = diffusers.AutoencoderKLQwenImage(**config).eval()
    _fill_random(reference, seed)
    folder = tmp_path_factory.mktemp("ckpt") / "vae"
    reference.save_pretrained(folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    return reference, state, dict(reference.config)


@pytest.fixture(scope="module")
def ckpt_a(tmp_path_factory):
    return _write_checkpoint(tmp_path_factory, CONFIG_A, seed=1)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    return _write_checkpoint(tmp_path_factory, CONFIG_B, seed=2)


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _ours(state, config) -> QwenImageVAE:
    model = QwenImageVAE.from_checkpoint(_shapes(state), config)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def vae_a(ckpt_a):
    return _ours(ckpt_a[1], None)  # shapes suffice for z_dim 16


def _stats(config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1, 1)
    return mean, std


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("which", ["a", "a_config", "b"])
def test_decode_matches_diffusers(which, ckpt_a, ckpt_b):
    reference, state, config = ckpt_a if which.startswith("a") else ckpt_b
    ours = _ours(state, None if which == "a" else config)
    g = torch.Generator().manual_seed(10)
    latents = torch.randn(2, config["z_dim"], 5, 6, generator=g)

    mean, std = _stats(config)
    with torch.no_grad():  # as QwenImagePipeline: (B, z, 1, h, w), latents / (1/std) + mean
        expected = reference.decode(latents[:, :, None] / (1.0 / std) + mean).sample[:, :, 0]
    got = ours.decode(latents)

    f = ours.params.scale_factor
    assert got.shape == (2, 3, 5 * f, 6 * f) and got.dtype == torch.float32
    assert (expected.abs() < 1).float().mean() > 0.5  # the comparison is not all clamped
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["a", "b"])
def test_encode_matches_diffusers(which, ckpt_a, ckpt_b):
    reference, state, config = ckpt_a if which == "a" else ckpt_b
    ours = _ours(state, config)
    g = torch.Generator().manual_seed(11)
    f = ours.params.scale_factor
    image = torch.rand(2, 3, 6 * f, 5 * f, generator=g) * 2 - 1

    mean, std = _stats(config)
    with torch.no_grad():  # as the img2img pipelines: the posterior mode, then (x - mean) * (1/std)
        posterior = reference.encode(image[:, :, None]).latent_dist.mode()
        expected = ((posterior - mean) * (1.0 / std))[:, :, 0]
    got = ours.encode(image)

    assert got.shape == (2, config["z_dim"], 6, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_causal_conv_single_frame_is_conv2d_with_last_kernel_slice():
    conv = CausalConv3d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 7, 6)
    # the causal definition: two zero frames in front, spatial padding 1, a true conv3d
    padded = F.pad(x[:, :, None], (1, 1, 1, 1, 2, 0))
    expected = F.conv3d(padded, conv.weight, conv.bias)[:, :, 0]
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        conv(x[:, :, None])


def test_bf16_weights_compute_in_bf16_and_return_float32(ckpt_a):
    """bfloat16 against float32, with diffusers' own VAE cast to bfloat16 as the yardstick of what the
    rounding gives. Measured (|diff| to our float32 result): decode mean 0.0056 / max 0.051, diffusers
    0.0054 / 0.059; encode mean 0.0026 / max 0.019, diffusers 0.0025 / 0.018. The decoder's conv_out
    rounded through float8 gives decode mean 0.011. Bounds: mean <= 1.25 x diffusers' and max <= 0.1
    (decode) / 0.04 (encode)."""
    import copy

    reference, state, config = ckpt_a
    model = _ours(state, None)
    mean, std = _stats(config)
    g = torch.Generator().manual_seed(12)
    latents = torch.randn(2, 16, 6, 8, generator=g)
    image = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    decoded, encoded = model.decode(latents), model.encode(image)
    assert (decoded.abs() < 1).float().mean() > 0.8 and decoded.std() > 0.2  # not clamped, not flat
    assert encoded.std() > 0.2
    theirs = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        their_decoded = theirs.decode((latents[:, :, None] / (1.0 / std) + mean).to(torch.bfloat16)
                                      ).sample[:, :, 0].float().clamp(-1, 1)
        their_encoded = ((theirs.encode(image[:, :, None].to(torch.bfloat16)).latent_dist.mode().float() - mean)
                         * (1.0 / std))[:, :, 0]
    model.to(torch.bfloat16)
    got_decoded, got_encoded = model.decode(latents), model.encode(image)
    assert got_decoded.dtype == got_encoded.dtype == torch.float32
    assert got_encoded.shape == (2, 16, 6, 8)
    for what, got, their, expected, worst in (("decode", got_decoded, their_decoded, decoded, 0.1),
                                              ("encode", got_encoded, their_encoded, encoded, 0.04)):
        error, their_error = (got - expected).abs(), (their - expected).abs()
        assert error.mean() <= 1.25 * their_error.mean() and error.max() <= worst, (
            f"{what}: mean {error.mean():.4f} (diffusers' bf16: {their_error.mean():.4f}), max {error.max():.4f}")


# ----------------------------------------------------------------------------- checkpoint contract


def test_checkpoint_contract(ckpt_a):
    state = ckpt_a[1]
    assert all(key in state for key in QwenImageVAE.CHECKPOINT_REQUIRED_KEYS)
    assert all(QwenImageVAE.owns_checkpoint_key(k) for k in state)
    assert not QwenImageVAE.owns_checkpoint_key("transformer_blocks.0.attn.to_q.weight")
    assert all(QwenImageVAE.convert_checkpoint_key(k) == k for k in state)
    # the 3D conv weights stay 5-D, as on disk
    assert state["encoder.conv_in.weight"].dim() == 5


def test_real_config_is_inferred_from_shapes_alone():
    with torch.device("meta"):
        reference = diffusers.AutoencoderKLQwenImage()
        model = QwenImageVAE.from_checkpoint(_shapes(reference.state_dict()), None)
    assert model.params == QwenImageVAEParams()
    assert model.params.latents_mean == LATENTS_MEAN and model.params.latents_std == LATENTS_STD
    assert sum(p.numel() for p in model.parameters()) == 126_892_531


def test_attention_stages_and_temporal_pattern_are_inferred():
    config = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 4], num_res_blocks=2, attn_scales=[0.5, 0.25],
                  temperal_downsample=[True, False, True])
    with torch.device("meta"):
        reference = diffusers.AutoencoderKLQwenImage(**config)
        params = QwenImageVAE.params_from_checkpoint(_shapes(reference.state_dict()))
        QwenImageVAE.from_checkpoint(_shapes(reference.state_dict()), None)  # keys and shapes match
    assert params.dim_mult == (1, 2, 2, 4) and params.num_res_blocks == 2
    assert params.attn_scales == (0.5, 0.25) and params.temperal_downsample == (True, False, True)


def test_config_wins_and_latent_stats_come_from_it(ckpt_b):
    state, config = ckpt_b[1], ckpt_b[2]
    shapes = _shapes(state)
    with pytest.raises(ValueError, match="latents_mean has 16 values but z_dim is 4"):
        QwenImageVAE.from_checkpoint(shapes, None)  # shapes cannot tell the latent statistics
    params = QwenImageVAE.params_from_checkpoint(
        shapes, {"latents_mean": config["latents_mean"], "latents_std": config["latents_std"]})
    assert params == QwenImageVAEParams(**CONFIG_B)


def test_inconsistent_shapes_are_named(ckpt_a):
    shapes = _shapes(ckpt_a[1])
    bad = dict(shapes, **{"quant_conv.weight": (16, 32, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"'quant_conv\.weight' has 16 output channels"):
        QwenImageVAE.from_checkpoint(bad, None)
    bad = dict(shapes, **{"encoder.down_blocks.2.conv1.weight": (12, 8, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"'encoder\.down_blocks\.2\.conv1\.weight' has 12 output channels"):
        QwenImageVAE.from_checkpoint(bad, None)
    bad = {k: v for k, v in shapes.items() if k != "post_quant_conv.weight"}
    with pytest.raises(ValueError, match=r"lacks the key 'post_quant_conv\.weight'"):
        QwenImageVAE.from_checkpoint(bad, None)


def test_bad_inputs_are_reported(vae_a):
    with pytest.raises(ValueError, match="multiples of 8"):
        vae_a.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"latents \(B, 16, h, w\)"):
        vae_a.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="tile_stride"):
        vae_a.decode(torch.zeros(1, 16, 4, 9), tiled=True, tile_size=4, tile_stride=5)


# ----------------------------------------------------------------------------- tiling


def test_tiling_blends_to_the_exact_result_for_a_pixelwise_function():
    # A function without spatial context: every tile is exact where it is, so the blend
    # (weights summing to one) must give back the untiled result, for awkward sizes too.
    weight = torch.randn(5, 3, 1, 1)

    def fn(x):  # grid cell -> 8x8 output pixels
        return F.interpolate(F.conv2d(x, weight), scale_factor=8, mode="nearest")

    for h, w, tile, stride in [(13, 21, 8, 5), (9, 30, 4, 1), (16, 16, 8, 8), (5, 17, 6, 3)]:
        x = torch.randn(2, 3, h, w)
        got = tiled_map(fn, x, (h, w), tile, stride, in_scale=1, out_scale=8)
        torch.testing.assert_close(got, fn(x), atol=1e-5, rtol=1e-5)


def test_tiling_has_no_seams():
    # Each tile returns a different constant; the linear ramps turn the steps between tiles
    # into gentle slopes: no jump between neighbouring pixels is near a tile-to-tile step.
    count = [0]

    def fn(x):
        count[0] += 1
        return torch.full((1, 1, x.shape[-2] * 8, x.shape[-1] * 8), float(count[0] % 2) * 4.0)

    out = tiled_map(fn, torch.zeros(1, 1, 14, 22), (14, 22), 8, 4, in_scale=1, out_scale=8)
    assert count[0] == 3 * 5
    jumps = max(out.diff(dim=-1).abs().max().item(), out.diff(dim=-2).abs().max().item())
    assert jumps < 4.0 / 8  # a hard seam would be 4.0; the overlap is 32 pixels


def test_tiled_decode_is_the_blend_of_tile_decodes(vae_a):
    # Two tiles side by side (starts 0 and 4, overlap 4 latent = 32 pixels): the result is
    # tile 0, a linear cross-fade over the overlap, then tile 1 -- written out independently.
    latents = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(20))
    got = vae_a.decode(latents, tiled=True, tile_size=8, tile_stride=4)
    tiles = vae_a.decode(latents[..., :8]), vae_a.decode(latents[..., 4:])
    ramp = torch.arange(1, 33, dtype=torch.float32) / 33  # weight of the right tile in the overlap
    expected = torch.cat([tiles[0][..., :32], tiles[0][..., 32:] * (1 - ramp) + tiles[1][..., :32] * ramp,
                          tiles[1][..., 32:]], dim=-1)
    # decode clamps each tile, the tiled decode clamps the blend: compare where no tile saturates
    pad = torch.zeros(1, 3, 64, 32)
    inside = (torch.cat([tiles[0], pad], -1).abs() < 1) & (torch.cat([pad, tiles[1]], -1).abs() < 1)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(got[inside], expected[inside], atol=1e-5, rtol=0)


def test_tiled_encode_is_the_blend_of_tile_encodes(vae_a):
    # Two tiles side by side (latent columns 0-7 and 4-11, overlap 4): the moments of tile 0, a
    # linear cross-fade over the overlap, then tile 1; the latent normalisation is affine per
    # channel, so the blend of normalised tile latents is the normalised blend.
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(23)) * 2 - 1
    got = vae_a.encode(image, tiled=True, tile_size=8, tile_stride=4)
    tiles = vae_a.encode(image[..., :64]), vae_a.encode(image[..., 32:])
    ramp = torch.arange(1, 5, dtype=torch.float32) / 5  # weight of the right tile in the overlap
    expected = torch.cat([tiles[0][..., :4], tiles[0][..., 4:] * (1 - ramp) + tiles[1][..., :4] * ramp,
                          tiles[1][..., 4:]], dim=-1)
    assert expected.std() > 0.2 and (tiles[0][..., 4:] - tiles[1][..., :4]).abs().mean() > 0.05  # tiles differ
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_tiled_matches_untiled_approximately(vae_a):
    # Tiles see zero padding at their borders and the mid-block attention is global, and the
    # random tiny VAE's receptive field (~ +-13 latent pixels) exceeds the 4-latent-pixel
    # overlap used here, so tiled != untiled exactly (a real VAE with tile 128 / stride 64 is
    # far more local); the exact blend is checked above. Measured mean |diff|: decode 0.071 on
    # outputs of std 0.5, encode 0.047 on latents of std 0.49; the result shifted by one latent
    # pixel gives 0.53 (decode) and 0.18 (encode). Bound: mean < 0.1; tiling must show (> 0).
    g = torch.Generator().manual_seed(21)
    latents = torch.randn(1, 16, 12, 20, generator=g)
    tiled = vae_a.decode(latents, tiled=True, tile_size=8, tile_stride=4)
    untiled = vae_a.decode(latents)
    assert tiled.shape == untiled.shape == (1, 3, 96, 160)
    assert untiled.std() > 0.3 and (untiled.abs() < 1).float().mean() > 0.8  # not flat, not clamped
    assert 0 < (tiled - untiled).abs().mean() < 0.1

    image = F.interpolate(torch.rand(1, 3, 12, 20, generator=g) * 2 - 1, scale_factor=8, mode="bilinear")
    tiled = vae_a.encode(image, tiled=True, tile_size=8, tile_stride=4)
    untiled = vae_a.encode(image)
    assert tiled.shape == untiled.shape == (1, 16, 12, 20)
    assert untiled.std() > 0.3
    assert 0 < (tiled - untiled).abs().mean() < 0.1


def test_tiling_odd_sizes_and_small_inputs(vae_a):
    g = torch.Generator().manual_seed(22)
    latents = torch.randn(1, 16, 13, 11, generator=g)  # not multiples of the stride
    out = vae_a.decode(latents, tiled=True, tile_size=8, tile_stride=5)
    assert out.shape == (1, 3, 104, 88) and torch.isfinite(out).all()
    assert (out - vae_a.decode(latents)).abs().mean() < 0.1
    image = out * 0.9
    lat = vae_a.encode(image, tiled=True, tile_size=8, tile_stride=5)
    assert lat.shape == (1, 16, 13, 11) and torch.isfinite(lat).all()

    # a tile at least as large as the input is the untiled path, bit for bit
    small = torch.randn(2, 16, 6, 8, generator=g)
    assert torch.equal(vae_a.decode(small, tiled=True, tile_size=8, tile_stride=4), vae_a.decode(small))
    small_image = torch.rand(2, 3, 48, 64, generator=g) * 2 - 1
    assert torch.equal(vae_a.encode(small_image, tiled=True, tile_size=8, tile_stride=4),
                       vae_a.encode(small_image))
