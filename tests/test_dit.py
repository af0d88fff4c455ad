"""Parity of pipelines.models.qwen_image_dit with diffusers' QwenImageTransformer2DModel on tiny
random checkpoints written by diffusers' own save_pretrained (CPU, float32)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

TINY = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 14, 14),  # = the rule at D=32
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter non-zero and distinct: norm weights 1 +- noise, the rest small noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def _save_diffusers(tmp_path: Path, config: dict, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    ref = QwenImageTransformer2DModel(**config).eval()
    _randomise(ref, seed)
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    return ref, folder


def _read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    shapes, tensors = {}, {}
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors written in {folder}"
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
        tensors.update(safetensors_torch.load_file(str(file)))
    config = json.loads((folder / "config.json").read_text())
    return shapes, tensors, config


def _load_ours(folder: Path, use_config: bool = True) -> QwenImageDiT:
    shapes, tensors, config = _read_checkpoint(folder)
    converted = {QwenImageDiT.convert_checkpoint_key(k): v for k, v in shapes.items()
                 if QwenImageDiT.owns_checkpoint_key(k)}
    assert len(converted) == len(shapes)
    with torch.device("meta"):  # as the loader does: no initialisation work
        ours = QwenImageDiT.from_checkpoint(converted, config if use_config else None)
    ours.load_state_dict(tensors, strict=True, assign=True)
    return ours.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref, folder = _save_diffusers(tmp_path_factory.mktemp("tiny"), TINY)
    return ref, _load_ours(folder)


def _inputs(batch: int, height: int, width: int, text_len: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, height * width, TINY["in_channels"], generator=gen)
    text = torch.randn(batch, text_len, TINY["joint_attention_dim"], generator=gen)
    sigma = torch.rand(batch, generator=gen)
    return latents, sigma, text


def _reference(ref, latents, sigma, text, mask, height, width):
    # As diffusers' QwenImagePipeline calls it: sigma as timestep, a 0/1 long mask or None.
    with torch.no_grad():
        return ref(hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                   timestep=sigma, img_shapes=[(1, height, width)] * latents.shape[0], return_dict=False)[0]


def _assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    scale = expected.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    err = (ours - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"max abs error {err:.3g} at output scale {scale:.3g}"


@pytest.mark.parametrize("height,width,text_len", [(4, 4, 7), (3, 5, 6), (4, 6, 9), (5, 3, 1)])
def test_parity_batch1_no_mask(tiny, height, width, text_len):
    ref, ours = tiny
    latents, sigma, text = _inputs(1, height, width, text_len)
    with torch.no_grad():
        out = ours(latents, sigma, text, None, height, width)
    assert out.shape == (1, height * width, TINY["patch_size"] ** 2 * TINY["out_channels"])
    _assert_close(out, _reference(ref, latents, sigma, text, None, height, width))


def test_parity_batch2_padded_text(tiny):
    ref, ours = tiny
    height, width, lengths = 3, 4, (7, 4)
    latents, sigma, text = _inputs(2, height, width, max(lengths), seed=3)
    mask = torch.zeros(2, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        text[i, n:] = 0.0  # the reference pipeline pads prompt embeddings with zeros
    expected = _reference(ref, latents, sigma, text, mask, height, width)
    with torch.no_grad():
        out = ours(latents, sigma, text, mask.bool(), height, width)
        alone = ours(latents[1:], sigma[1:], text[1:, :lengths[1]], None, height, width)
    _assert_close(out, expected)
    # Padding is invisible to the image: the short prompt alone gives the same velocity.
    _assert_close(out[1:], alone)


def test_bfloat16_tracks_diffusers(tiny):
    """In bf16 both implementations round differently; ours must be as close to the fp32
    result as diffusers' bf16 is (this also pins the timestep embedding's rounding)."""
    import copy

    ref, ours = tiny
    ref16, ours16 = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
    latents, _, text = _inputs(1, 4, 5, 6, seed=6)
    sigma = torch.tensor([0.6])  # not a bf16 value: both round it to 0.6015625 before the sinusoid
    expected = _reference(ref, latents, sigma.bfloat16().float(), text, None, 4, 5)
    b16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    theirs = _reference(ref16, b16(latents), sigma, b16(text), None, 4, 5).float()
    with torch.no_grad():
        out = ours16(latents, sigma, text, None, 4, 5)
    assert out.dtype == torch.bfloat16
    scale = expected.abs().max()
    ours_err = ((out.float() - expected).abs().max() / scale).item()
    theirs_err = ((theirs - expected).abs().max() / scale).item()
    assert ours_err < 2e-2 and ours_err <= 1.5 * theirs_err + 1e-3, (ours_err, theirs_err)


def test_the_mask_hides_what_is_under_it(tiny):
    """The masked path with real padding: large garbage (not zeros) under the mask gives, per sample,
    the velocity of the unpadded text alone and diffusers' result for the same input and mask; an
    all-true mask gives diffusers' result with its all-ones mask."""
    ref, ours = tiny
    height, width, lengths = 2, 3, (5, 2)
    latents, sigma, text = _inputs(2, height, width, max(lengths), seed=4)
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    padded = text.clone()
    padded[1, lengths[1]:] = 50 * torch.randn(max(lengths) - lengths[1], TINY["joint_attention_dim"],
                                              generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = ours(latents, sigma, padded, mask.bool(), height, width)
        unmasked = ours(latents, sigma, padded, None, height, width)
        for i, n in enumerate(lengths):
            _assert_close(out[i:i + 1], ours(latents[i:i + 1], sigma[i:i + 1], text[i:i + 1, :n], None, height, width))
        all_true = ours(latents, sigma, text, torch.ones(2, max(lengths), dtype=torch.bool), height, width)
    assert (unmasked[1] - out[1]).abs().max() > 1e-2  # the garbage shows where it is not masked
    _assert_close(out, _reference(ref, latents, sigma, padded, mask, height, width))
    _assert_close(all_true, _reference(ref, latents, sigma, text, torch.ones_like(mask), height, width))


def test_state_dict_matches_diffusers_at_full_size():
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        ref = QwenImageTransformer2DModel()
        ours = QwenImageDiT(QwenImageDiTParams())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == 1933
    assert sum(p.numel() for p in ours.parameters()) == 20_430_401_088
    assert not list(ours.buffers())
    assert all(k in our_shapes for k in QwenImageDiT.CHECKPOINT_REQUIRED_KEYS)
    assert all(QwenImageDiT.owns_checkpoint_key(k) for k in our_shapes)
    # The rule recovers the published config from the shapes alone.
    with torch.device("meta"):
        again = QwenImageDiT.from_checkpoint(our_shapes, None)
    assert again.params == QwenImageDiTParams()


def test_edit_2511_checkpoint_at_full_size_on_meta():
    """Qwen-Image-Edit-2511's transformer: the same tensors as Qwen-Image's; only its
    config.json's zero_cond_t differs, and it reaches the params."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(zero_cond_t=True)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = QwenImageDiT.from_checkpoint(shapes, config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    assert ours.params == QwenImageDiTParams(zero_cond_t=True)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_parity_with_reference_pictures(tmp_path, zero_cond_t):
    """Edit models: the generated tokens then each picture's in one sequence, RoPE frame i for
    picture i, the text after the largest grid; 2511 modulates the pictures' tokens at t = 0."""
    ref, folder = _save_diffusers(tmp_path, dict(TINY, zero_cond_t=zero_cond_t), seed=3)
    ours = _load_ours(folder)
    assert ours.params.zero_cond_t == zero_cond_t
    grids = [(3, 4), (2, 5), (6, 3)]  # generated, then two pictures (the last one the tallest)
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, sum(h * w for h, w in grids), TINY["in_channels"], generator=gen)
    text = torch.randn(1, 7, TINY["joint_attention_dim"], generator=gen)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        out = ours(latents, sigma, text, None, 3, 4, references=grids[1:])
        expected = ref(hidden_states=latents, encoder_hidden_states=text, timestep=sigma,
                       img_shapes=[[(1, h, w) for h, w in grids]], return_dict=False)[0][:, :12]
        other = ours(latents, sigma, text, None, 3, 4, references=grids[1:], zero_cond_t=not zero_cond_t)
    _assert_close(out, expected)
    assert (other - out).abs().max() > 1e-3  # the flag changes the result


def test_from_checkpoint_infers_params_without_config(tmp_path, tiny):
    ref, _ = tiny
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    ours = _load_ours(folder, use_config=False)
    p = ours.params
    assert (p.num_layers, p.num_attention_heads, p.attention_head_dim, p.in_channels, p.out_channels,
            p.joint_attention_dim, p.axes_dims_rope) == (2, 2, 32, 16, 4, 24, (4, 14, 14))
    latents, sigma, text = _inputs(1, 3, 5, 4, seed=5)
    with torch.no_grad():
        out = ours(latents, sigma, text, None, 3, 5)
    _assert_close(out, _reference(ref, latents, sigma, text, None, 3, 5))


def test_config_axes_win_over_the_rule(tmp_path):
    config = dict(TINY, attention_head_dim=16, axes_dims_rope=(4, 6, 6))  # the rule would give odd 2,7,7
    ref, folder = _save_diffusers(tmp_path, config, seed=7)
    ours = _load_ours(folder)
    assert ours.params.axes_dims_rope == (4, 6, 6) and ours.params.attention_head_dim == 16
    latents, sigma, text = _inputs(1, 4, 3, 5, seed=8)
    with torch.no_grad():
        out = ours(latents, sigma, text, None, 4, 3)
    _assert_close(out, _reference(ref, latents, sigma, text, None, 4, 3))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="even"):
        QwenImageDiT.from_checkpoint(shapes, None)


def _tiny_shapes() -> dict:
    with torch.device("meta"):
        model = QwenImageDiT(QwenImageDiTParams(**TINY))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_from_checkpoint_errors():
    shapes = _tiny_shapes()
    with pytest.raises(NotImplementedError, match="guidance_embeds"):
        QwenImageDiT.from_checkpoint(shapes, dict(TINY, guidance_embeds=True))
    with pytest.raises(ValueError, match="sums to"):
        QwenImageDiT.from_checkpoint(shapes, dict(TINY, axes_dims_rope=(4, 14, 16)))
    assert not QwenImageDiT.owns_checkpoint_key("encoder.conv_in.weight")
    assert not QwenImageDiT.owns_checkpoint_key("model.layers.0.mlp.up_proj.weight")


def test_forward_rejects_bad_shapes(tiny):
    _, ours = tiny
    latents, sigma, text = _inputs(1, 3, 4, 5)
    with pytest.raises(ValueError, match="12 image tokens.*3x5 make 15"):
        ours(latents, sigma, text, None, 3, 5)
    with pytest.raises(ValueError, match="latents must be"):
        ours(latents[..., :8], sigma, text, None, 3, 4)
    with pytest.raises(ValueError, match="text must be"):
        ours(latents, sigma, text[..., :5], None, 3, 4)
    with pytest.raises(ValueError, match="text_mask"):
        ours(latents, sigma, text, torch.ones(1, 4, dtype=torch.bool), 3, 4)
    with pytest.raises(ValueError, match="timestep"):
        ours(latents, torch.rand(3), text, None, 3, 4)
