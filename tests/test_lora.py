"""LoRA: parity with diffusers + peft, every file format, exact removal, stacking, alpha in place,
and a clear error (with the model unchanged) for every bad input."""
from __future__ import annotations

import contextlib
import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.core import lora as lora_module
from pipelines.core.loader import CheckpointError
from pipelines.core.lora import LoraError, clear_lora, load_lora, loaded_loras, prepare_lora
from pipelines.core.lora import apply as lora_apply
from pipelines.core.model_config import ModelConfig
from pipelines.demo.lora import FORMATS, lora_state_dict, random_lora, save_lora
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams
from tests.support.weights import randomize_

from .test_pipeline import PROMPT, assert_same_image, ours_from, pixels

TINY = dict(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
            axes_dims_rope=(4, 14, 14))
# every linear layer of the DiT, as peft target names (matched as name suffixes)
ALL_LINEARS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1",
               "txt_mod.1", "img_in", "txt_in", "proj_out", "norm_out.linear", "linear_1", "linear_2"]


def tiny_dit(seed: int = 0, **overrides) -> QwenImageDiT:
    return randomize_(QwenImageDiT(QwenImageDiTParams(**{**TINY, **overrides})), seed).eval().requires_grad_(False)


def shapes_of(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, f"weights differ: {different[:5]}"


def dit_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 64, generator=g), torch.tensor([0.7]), torch.randn(1, 5, 32, generator=g), None, 4, 4)


@pytest.fixture
def dit():
    return tiny_dit()


@pytest.fixture
def lora_file(dit, tmp_path):
    """A kohya LoRA (scale alpha/rank = 2) over every linear layer of the tiny DiT."""
    return save_lora(tmp_path / "kohya.safetensors", random_lora(shapes_of(dit), rank=4, seed=1), "kohya", 2.0)


# ============================================================================ parity with diffusers + peft


RANK, LORA_ALPHA = 4, 8
SCALE = LORA_ALPHA / RANK  # peft's scaling of the reference adapter


@pytest.fixture(scope="module")
def peft_lora(diffusers_repo, tmp_path_factory):
    """The reference: a LoRA made with peft on diffusers' transformer (every linear layer, rank 4,
    lora_alpha 8, random non-zero A and B), written by diffusers' `save_lora_weights` (with its
    adapter metadata) and by peft's own `PeftModel.save_pretrained` (`base_model.model.` keys +
    adapter_config.json); the effective weights peft computes for it (base + get_delta_weight)."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    root, reference = diffusers_repo
    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=ALL_LINEARS, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(reference.transformer), config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    folder = tmp_path_factory.mktemp("peft_lora")
    model.save_pretrained(str(folder / "peft"))
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    QwenImagePipeline.save_lora_weights(folder / "diffusers", transformer_lora_layers=state,
                                        transformer_lora_adapter_metadata=config.to_dict())
    layers = {k[: -len(".lora_A.weight")]: (v, state[k.replace("lora_A", "lora_B")])
              for k, v in state.items() if k.endswith("lora_A.weight")}
    assert len(layers) == 34  # 14 linear layers per block x 2 blocks + 6 top-level ones
    effective = {}
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight"):
                effective[name + ".weight"] = module.base_layer.weight + module.get_delta_weight("default")
    assert effective.keys() == {name + ".weight" for name in layers}
    return SimpleNamespace(diffusers=folder / "diffusers" / "pytorch_lora_weights.safetensors",
                           peft=folder / "peft", layers=layers, effective=effective, folder=folder)


# ---------------------------------------------------------------- the published formats, written here
#
# Each file holds the reference adapter renamed by its tool's published key convention, written out
# below (not by pipelines.demo.lora): A is the down projection (rank, in), B the up one (out, rank);
# formats with an `.alpha` store alpha = scale * rank, formats without one carry the scale in B.


def kohya_state(layers) -> dict[str, torch.Tensor]:
    """kohya-ss sd-scripts / musubi-tuner: `lora_unet_` + the module path with `_` for `.`."""
    state = {}
    for name, (A, B) in layers.items():
        base = "lora_unet_" + name.replace(".", "_")
        state[base + ".lora_down.weight"], state[base + ".lora_up.weight"] = A, B
        state[base + ".alpha"] = torch.tensor(float(LORA_ALPHA))
    return state


def lightx2v_state(layers) -> dict[str, torch.Tensor]:
    """lightx2v's Qwen-Image-Lightning files: the module path, lora_down / lora_up / alpha."""
    state = {}
    for name, (A, B) in layers.items():
        state[name + ".lora_down.weight"], state[name + ".lora_up.weight"] = A, B
        state[name + ".alpha"] = torch.tensor(float(LORA_ALPHA))
    return state


def comfyui_state(layers, with_alpha: bool) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen-Image LoRAs: `diffusion_model.` + the module path, either peft's lora_A / lora_B
    (no alpha: scale 1) or kohya's lora_down / lora_up / alpha."""
    state = {}
    for name, (A, B) in layers.items():
        base = "diffusion_model." + name
        if with_alpha:
            state[base + ".lora_down.weight"], state[base + ".lora_up.weight"] = A, B
            state[base + ".alpha"] = torch.tensor(float(LORA_ALPHA))
        else:
            state[base + ".lora_A.weight"], state[base + ".lora_B.weight"] = A, B * SCALE
    return state


def diffsynth_state(layers, transformer) -> dict[str, torch.Tensor]:
    """DiffSynth-Studio's trainer: peft's `inject_adapter_in_model` (adapter "default", lora_alpha =
    rank: scale 1) and the LoRA entries of the model's own state_dict (`<path>.lora_A.default.weight`)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=ALL_LINEARS),
                                    copy.deepcopy(transformer), adapter_name="default")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in layers:
                module.lora_A["default"].weight.copy_(layers[name][0])
                module.lora_B["default"].weight.copy_(layers[name][1] * SCALE)
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


@pytest.fixture(scope="module")
def format_files(peft_lora, diffusers_repo):
    """format -> (file, the name our loader gives the format)."""
    layers = peft_lora.layers
    states = {"kohya": (kohya_state(layers), "kohya/musubi"), "lightx2v": (lightx2v_state(layers), "lightx2v"),
              "comfyui": (comfyui_state(layers, False), "ComfyUI"),
              "comfyui_alpha": (comfyui_state(layers, True), "ComfyUI"),
              "diffsynth": (diffsynth_state(layers, diffusers_repo[1].transformer), "DiffSynth")}
    files = {"diffusers": (peft_lora.diffusers, "diffusers"), "peft": (peft_lora.peft, "peft")}
    for fmt, (state, label) in states.items():
        path = peft_lora.folder / f"{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[fmt] = (path, label)
    return files


def test_diffusers_reads_the_written_formats_as_the_reference(peft_lora, format_files):
    """diffusers' own converter (QwenImagePipeline.lora_state_dict: kohya/musubi, ComfyUI, DiffSynth,
    lightx2v keys, alpha folded into A/B) gives back the reference update for every layer: the files
    written above really are what those tools write."""
    from diffusers import QwenImagePipeline

    for fmt in ("kohya", "lightx2v", "comfyui", "comfyui_alpha", "diffsynth"):
        converted = QwenImagePipeline.lora_state_dict(str(format_files[fmt][0]))
        assert len(converted) == 2 * len(peft_lora.layers), fmt
        for name, (A, B) in peft_lora.layers.items():
            up, down = converted[f"transformer.{name}.lora_B.weight"], converted[f"transformer.{name}.lora_A.weight"]
            torch.testing.assert_close(up @ down, SCALE * (B @ A), rtol=0, atol=1e-6, msg=f"{fmt}: {name}")


# Effective weights: ours fuse W + alpha * scale * B @ A with one addmm in float32; the reference is
# peft's W + (B @ A) * scale, scaled by alpha here. Measured: identical at alpha 1 (a power-of-two
# scale), max |diff| 6e-8 at alpha 0.5 (the reference's own rounding). A lost layer, a wrong scale or
# swapped factors move the largest entry of each layer's update, 0.2 to 0.67 here, by that much or a
# good part of it. Bound: 1e-6.
EFFECTIVE_ATOL = 1e-6


def assert_effective_weights(dit, base: dict[str, torch.Tensor], effective: dict[str, torch.Tensor],
                             alpha: float, what: str) -> None:
    state = dit.state_dict()
    for key, weight in base.items():
        expected = base[key] + alpha * (effective[key] - base[key]) if key in effective else weight
        torch.testing.assert_close(state[key], expected, rtol=0, atol=EFFECTIVE_ATOL, msg=f"{what}: {key}")


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya", "lightx2v", "comfyui", "comfyui_alpha", "diffsynth"])
def test_every_format_loads_to_the_peft_effective_weights(fmt, peft_lora, format_files, ours):
    path, label = format_files[fmt]
    dit = ours.dit
    base = snapshot(dit)
    for alpha in (1.0, 0.5):  # at 0.5 the scale is not a power of two: the update itself is scaled
        handle = load_lora(dit, path, alpha=alpha)
        try:
            assert handle.prepared.format == label
            assert sorted(handle.layers) == sorted(peft_lora.layers)
            assert_effective_weights(dit, base, peft_lora.effective, alpha, f"{fmt} at alpha {alpha}")
        finally:
            clear_lora(dit)
    assert_same_weights(dit, base)


def test_the_test_writer_agrees_with_the_published_formats(peft_lora, format_files, ours):
    """pipelines.demo.lora (benchmarks and the runner's tests write their LoRAs with it) writes
    what the published conventions above hold."""
    dit = ours.dit
    base = snapshot(dit)
    for fmt in FORMATS:
        handle = load_lora(dit, save_lora(peft_lora.folder / "ours" / f"{fmt}.safetensors", peft_lora.layers, fmt,
                                          scale=SCALE))
        try:
            assert sorted(handle.layers) == sorted(peft_lora.layers)
            assert_effective_weights(dit, base, peft_lora.effective, 1.0, f"pipelines.demo.lora {fmt}")
        finally:
            clear_lora(dit)


@pytest.fixture(scope="module")
def ours(diffusers_repo):
    pipe = ours_from(diffusers_repo[0])
    yield pipe
    pipe.clear_lora()


IMAGE = dict(prompt=PROMPT, negative_prompt=" ", height=64, width=96, num_inference_steps=3)


@contextlib.contextmanager
def fuse_failing_at(call: int, monkeypatch):
    """Make the `call`-th layer fuse raise, as an out-of-memory midway would; restored after."""
    original, calls = lora_apply._fuse, []

    def failing(weight, source, layer, alpha):
        calls.append(layer.name)
        if len(calls) == call:
            raise RuntimeError("simulated out of memory")
        original(weight, source, layer, alpha)

    monkeypatch.setattr(lora_apply, "_fuse", failing)
    try:
        yield
    finally:
        monkeypatch.setattr(lora_apply, "_fuse", original)


def test_peft_lora_images_match_diffusers_cold_and_hot(diffusers_repo, peft_lora, ours):
    from diffusers import QwenImagePipeline

    _, reference = diffusers_repo
    path = peft_lora.diffusers
    diffusers_pipe = QwenImagePipeline(**{**reference.components,
                                          "transformer": copy.deepcopy(reference.transformer)})
    diffusers_pipe.load_lora_weights(str(path), adapter_name="tiny")
    expected = {}
    for alpha in (0.5, 1.0):  # diffusers' adapter weight multiplies peft's lora_alpha / r = 2
        diffusers_pipe.set_adapters(["tiny"], [alpha])
        expected[alpha] = diffusers_pipe(
            IMAGE["prompt"], negative_prompt=IMAGE["negative_prompt"], true_cfg_scale=4.0, height=64, width=96,
            num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5)).images[0]

    def generate():
        return ours(**IMAGE, cfg_scale=4.0, seed=5, progress_bar=False)

    base = generate()
    # the LoRA must change the image clearly, or the comparison would prove nothing
    assert np.abs(pixels(base) - pixels(expected[1.0])).mean() > 5
    assert np.abs(pixels(expected[0.5]) - pixels(expected[1.0])).mean() > 2  # a wrong scale would show

    handle = ours.load_lora(ours.dit, ModelConfig(path=path), alpha=1.0)
    assert not handle.hot and len(handle.layers) == len(peft_lora.layers)
    assert_same_image(generate(), expected[1.0])
    handle.set_alpha(0.5)
    assert_same_image(generate(), expected[0.5])
    ours.clear_lora()
    assert np.array_equal(pixels(generate()), pixels(base))

    handle = ours.load_lora(ours.dit, str(path), alpha=0.5, hotload=True)
    assert handle.hot
    assert_same_image(generate(), expected[0.5])
    handle.alpha = 1.0
    assert_same_image(generate(), expected[1.0])
    ours.clear_lora()
    assert np.array_equal(pixels(generate()), pixels(base))


def test_kohya_file_matches_diffusers_own_conversion(diffusers_repo, format_files, ours):
    """diffusers converts kohya keys (alpha / rank) itself: an image-level check of the scaling."""
    from diffusers import QwenImagePipeline

    _, reference = diffusers_repo
    path = format_files["kohya"][0]
    diffusers_pipe = QwenImagePipeline(**{**reference.components,
                                          "transformer": copy.deepcopy(reference.transformer)})
    diffusers_pipe.load_lora_weights(str(path), adapter_name="kohya")
    diffusers_pipe.set_adapters(["kohya"], [0.5])
    expected = diffusers_pipe(IMAGE["prompt"], negative_prompt=" ", true_cfg_scale=4.0, height=64, width=96,
                              num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    ours.load_lora(ours.dit, path, alpha=0.5)
    try:
        assert_same_image(ours(**IMAGE, cfg_scale=4.0, seed=5, progress_bar=False), expected)
    finally:
        ours.clear_lora()


def test_peft_saved_layout_loads_like_the_diffusers_file(peft_lora, ours):
    path, peft_dir = peft_lora.diffusers, peft_lora.peft
    dit = ours.dit
    load_lora(dit, path, alpha=0.7)
    expected = snapshot(dit)
    clear_lora(dit)
    handle = load_lora(dit, peft_dir, alpha=0.7)  # adapter_config.json: lora_alpha 8 / r 4
    assert handle.prepared.format == "peft"
    assert_same_weights(dit, expected)
    clear_lora(dit)
    held = lora_module.read_lora(path).in_memory()  # keeps diffusers' metadata (lora_alpha / r = 2)
    assert held.adapter_config["lora_alpha"] == 8
    load_lora(dit, held, alpha=0.7)
    assert_same_weights(dit, expected)
    clear_lora(dit)


def test_state_dict_and_model_config_sources(dit, tmp_path):
    layers = random_lora(shapes_of(dit), seed=4)
    path = save_lora(tmp_path / "l.safetensors", layers, "lightx2v", 1.0)
    load_lora(dit, path)
    expected = snapshot(dit)
    clear_lora(dit)
    load_lora(dit, lora_state_dict(layers, "comfyui"))
    assert_same_weights(dit, expected)
    clear_lora(dit)
    load_lora(dit, ModelConfig(model_id=tmp_path.name, origin_file_pattern="*.safetensors",
                               local_model_path=tmp_path.parent))
    assert_same_weights(dit, expected)
    clear_lora(dit)
    torch.save(lora_state_dict(layers, "diffsynth"), tmp_path / "l.pt")
    load_lora(dit, tmp_path / "l.pt")
    assert_same_weights(dit, expected)


# ============================================================================ removal, stacking, alpha


def test_clear_restores_bit_for_bit_after_cold_and_hot(dit, lora_file):
    base = snapshot(dit)
    inputs = dit_inputs()
    out_base = dit(*inputs)
    load_lora(dit, lora_file, alpha=0.8)
    assert not torch.equal(dit.state_dict()["img_in.weight"], base["img_in.weight"])
    load_lora(dit, lora_file, alpha=-0.3, hot=True)  # cold and hot together
    assert clear_lora(dit) == 2
    assert_same_weights(dit, base)
    assert torch.equal(dit(*inputs), out_base)

    handle = load_lora(dit, lora_file, hot=True)
    assert_same_weights(dit, base)  # hot never touches the weights
    assert not torch.equal(dit(*inputs), out_base)
    clear_lora(dit)
    assert all(not m._forward_hooks for m in dit.modules())
    assert torch.equal(dit(*inputs), out_base)
    with pytest.raises(RuntimeError, match="cleared"):
        handle.set_alpha(0.1)


def test_clear_restores_bfloat16_weights_bit_for_bit(lora_file):
    dit = tiny_dit().to(torch.bfloat16)
    base = snapshot(dit)
    load_lora(dit, lora_file, alpha=0.6)
    load_lora(dit, lora_file, alpha=0.6)
    clear_lora(dit)
    assert_same_weights(dit, base)


def test_stacking_equals_fusing_both(dit, tmp_path):
    shapes = shapes_of(dit)
    first = random_lora(shapes, rank=4, seed=5)
    second = random_lora(shapes, rank=8, seed=6, targets=["attn.to_q", "img_mlp.net.2", "proj_out"])
    f1 = save_lora(tmp_path / "a.safetensors", first, "diffusers")
    f2 = save_lora(tmp_path / "b.safetensors", second, "kohya", 0.5)
    base = snapshot(dit)
    expected = {}
    for key, weight in base.items():
        name = key[: -len(".weight")]
        w = weight.double()
        if name in first:
            w = w + 0.7 * first[name][1].double() @ first[name][0].double()
        if name in second:
            w = w + 1.3 * 0.5 * second[name][1].double() @ second[name][0].double()
        expected[key] = w.float()

    load_lora(dit, f1, alpha=0.7)
    load_lora(dit, f2, alpha=1.3)
    fused = snapshot(dit)
    for key in base:
        torch.testing.assert_close(fused[key], expected[key], rtol=1e-5, atol=1e-6)
    inputs = dit_inputs(1)
    out_cold = dit(*inputs)
    clear_lora(dit)

    load_lora(dit, f1, alpha=0.7, hot=True)
    load_lora(dit, f2, alpha=1.3, hot=True)
    torch.testing.assert_close(dit(*inputs), out_cold, rtol=1e-4, atol=1e-5)
    clear_lora(dit)
    load_lora(dit, f1, alpha=0.7)
    load_lora(dit, f2, alpha=1.3, hot=True)  # mixed
    torch.testing.assert_close(dit(*inputs), out_cold, rtol=1e-4, atol=1e-5)
    assert [h.hot for h in loaded_loras(dit)] == [False, True]


def test_the_same_file_loaded_twice_stacks_with_a_warning(dit, lora_file, tmp_path, caplog):
    """Twice the same file (by another spelling of its path too): applied twice, as before, the
    effect equal to one load at twice the alpha; a warning names the file and the way out."""
    once = load_lora(dit, lora_file, alpha=1.0)
    doubled = snapshot(dit)
    clear_lora(dit)
    load_lora(dit, lora_file, alpha=0.5)
    with caplog.at_level(logging.WARNING, logger="pipelines.core.lora.apply"):
        load_lora(dit, tmp_path / "." / lora_file.name, alpha=0.5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(lora_file.resolve()) in warnings[0]
    assert "applied 2 times" in warnings[0] and "set_alpha" in warnings[0] and "clear_lora" in warnings[0]
    assert len(loaded_loras(dit)) == 2
    for key, weight in snapshot(dit).items():
        torch.testing.assert_close(weight, doubled[key], rtol=1e-5, atol=1e-6)
    assert not once.active
    caplog.clear()
    clear_lora(dit)
    with caplog.at_level(logging.WARNING, logger="pipelines.core.lora.apply"):
        load_lora(dit, lora_file)  # after clear_lora: once again
        load_lora(dit, save_lora(tmp_path / "other.safetensors", random_lora(shapes_of(dit), rank=2, seed=3),
                                 "diffusers"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    clear_lora(dit)


def test_alpha_change_in_place_equals_a_fresh_load(dit, lora_file, tmp_path):
    other = save_lora(tmp_path / "o.safetensors", random_lora(shapes_of(dit), seed=9), "diffsynth")
    inputs = dit_inputs(2)
    for hot in (False, True):
        load_lora(dit, other, alpha=0.4, hot=hot)
        load_lora(dit, lora_file, alpha=0.9, hot=hot)
        fresh_weights, fresh_out = snapshot(dit), dit(*inputs)
        clear_lora(dit)
        load_lora(dit, other, alpha=0.4, hot=hot)
        handle = load_lora(dit, lora_file, alpha=0.2, hot=hot)
        handle.set_alpha(0.9)
        assert_same_weights(dit, fresh_weights)
        assert torch.equal(dit(*inputs), fresh_out)
        clear_lora(dit)


def test_pipeline_clear_lora_covers_all_models(ours):
    pipe = ours
    base = snapshot(pipe.dit)
    layers = random_lora(shapes_of(pipe.dit), seed=2)
    pipe.load_lora(pipe.dit, lora_state_dict(layers, "diffusers"), alpha=1.0)
    pipe.load_lora(pipe.dit, lora_state_dict(layers, "diffusers"), alpha=1.0, hotload=True)
    pipe.clear_lora()
    assert_same_weights(pipe.dit, base)
    assert loaded_loras(pipe.dit) == []
    with pytest.raises(TypeError, match="pipe.dit"):
        pipe.load_lora(None, lora_state_dict(layers, "diffusers"))


# ============================================================================ bad input


def test_unmatched_keys_are_an_error_with_suggestions(dit, caplog):
    layers = random_lora(shapes_of(dit), seed=7, targets=["attn.to_q", "attn.to_k"])
    state = lora_state_dict(layers, "diffusers")
    A, B = layers["transformer_blocks.0.attn.to_q"]
    state["transformer.transformer_blocks.0.attn.to_qq.lora_A.weight"] = A
    state["transformer.transformer_blocks.0.attn.to_qq.lora_B.weight"] = B
    state["transformer.transformer_blocks.0.attn.to_q.dora_scale"] = torch.ones(1, 64)
    base = snapshot(dit)
    with pytest.raises(LoraError) as error:
        load_lora(dit, state)
    message = str(error.value)
    assert "3 key(s)" in message and "to_qq" in message and "strict=False" in message
    assert "nearest layers: transformer_blocks.0.attn.to_q" in message
    assert "DoRA is not supported" in message
    assert_same_weights(dit, base)

    with caplog.at_level(logging.WARNING):
        handle = load_lora(dit, state, strict=False)
    assert "to_qq" in caplog.text and "Skipping" in caplog.text
    assert len(handle.layers) == 4 and len(handle.prepared.skipped_keys) == 3


def test_kohya_name_typo_suggests_the_flattened_layer(dit):
    state = lora_state_dict(random_lora(shapes_of(dit), targets=["img_in"]), "kohya")
    state = {k.replace("lora_unet_img_in", "lora_unet_img_inn"): v for k, v in state.items()}
    with pytest.raises(LoraError, match="no key.*img_in"):
        load_lora(dit, state)


def test_lora_for_another_model_names_the_first_mismatching_layer(dit, tmp_path):
    wide = tiny_dit(attention_head_dim=48, axes_dims_rope=(8, 20, 20))
    path = save_lora(tmp_path / "wide.safetensors", random_lora(shapes_of(wide), seed=8), "diffusers")
    base = snapshot(dit)
    with pytest.raises(LoraError, match=r"at layer 'img_in'.*lora_B \[96, 4\].*Linear\(64 -> 64\).*another model"):
        load_lora(dit, path)
    assert_same_weights(dit, base)
    text_encoder_keys = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
                         "model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4)}
    with pytest.raises(LoraError, match="no key of this .* matches a linear layer of QwenImageDiT"):
        load_lora(dit, text_encoder_keys, strict=False)
    assert_same_weights(dit, base)


def test_incomplete_lora_is_an_error(dit):
    state = lora_state_dict(random_lora(shapes_of(dit), targets=["proj_out"]), "lightx2v")
    del state["proj_out.lora_up.weight"]
    with pytest.raises(LoraError, match="'proj_out' has lora_A but no lora_B"):
        load_lora(dit, state)


def test_corrupt_and_missing_files(dit, lora_file, tmp_path):
    base = snapshot(dit)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(lora_file.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="broken.safetensors.*corrupt"):
        load_lora(dit, broken)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(dit, tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lora(dit, ModelConfig(path=tmp_path / "nope.safetensors"))
    assert_same_weights(dit, base)
    assert loaded_loras(dit) == []


def test_a_failure_while_fusing_leaves_the_earlier_loras(dit, tmp_path, monkeypatch):
    first = random_lora(shapes_of(dit), seed=13, targets=["attn.to_q", "img_mlp.net.2", "img_in"])
    load_lora(dit, lora_state_dict(first, "lightx2v"), alpha=0.5)  # some layers: others are first touched below
    before = snapshot(dit)
    second = save_lora(tmp_path / "s.safetensors", random_lora(shapes_of(dit), seed=12), "diffusers")
    with fuse_failing_at(20, monkeypatch), pytest.raises(RuntimeError, match="simulated"):
        load_lora(dit, second)
    assert_same_weights(dit, before)
    assert len(loaded_loras(dit)) == 1
    base = tiny_dit().state_dict()
    clear_lora(dit)
    assert_same_weights(dit, base)


def test_prepare_reads_nothing_when_shapes_do_not_fit(dit):
    reads = []
    state = lora_state_dict(random_lora(shapes_of(tiny_dit(joint_attention_dim=48)), seed=1), "diffusers")
    source = lora_module.read_lora(state)
    inner = source.read
    source.read = lambda keys: reads.append(keys) or inner(keys)
    with pytest.raises(LoraError, match="'txt_in'"):
        prepare_lora(dit, source)
    assert reads == []


def test_a_failure_while_changing_alpha_keeps_the_old_alpha(dit, lora_file, monkeypatch):
    handle = load_lora(dit, lora_file, alpha=0.5)
    before = snapshot(dit)
    with fuse_failing_at(5, monkeypatch), pytest.raises(RuntimeError, match="simulated"):
        handle.set_alpha(0.9)
    assert handle.alpha == 0.5
    assert_same_weights(dit, before)
