"""The config tree: every group and preset composes into a valid spec; bad keys and values
fail before any weight is loaded, naming the config path."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from runner.app import CONF_DIR
from runner.build import preflight
from runner.spec import ConfigError, RunSpec, TrackingBackend, register_configs, to_spec, validate

register_configs()

GROUPS = ("model", "vram", "lora", "sampler", "tracking")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def spec_of(*overrides: str) -> RunSpec:
    return to_spec(compose("config", overrides=list(overrides)))


def test_the_tree_has_the_groups_and_presets_of_the_issue():
    assert {"qwen_image", "qwen_image_tiny"} <= set(options("model"))
    assert set(options("vram")) == {"none", "cpu_offload", "fp8", "low_vram", "disk"}
    assert {"none", "artaug", "file", "stack"} <= set(options("lora"))
    assert {"default", "lightning"} <= set(options("sampler"))
    assert set(options("tracking")) == {"mlflow", "none"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_preset_composes_into_a_typed_spec(hydra_ctx, group, option):
    extra = ["lora.path=" + __file__] if (group, option) == ("lora", "file") else []
    spec = spec_of(f"{group}={option}", *extra)
    assert isinstance(spec, RunSpec)
    node = getattr(spec, group)
    if hasattr(node, "name"):
        assert node.name == option
    validate(spec)
    if group == "vram":
        preflight(spec)  # the library manages VRAM: every preset is accepted


def test_defaults(hydra_ctx):
    spec = spec_of()
    validate(spec)
    assert spec.model.name == "qwen_image"
    assert [f.origin_file_pattern for f in spec.model.files] == [
        "transformer/diffusion_pytorch_model*.safetensors",
        "text_encoder/model*.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert spec.model.tokenizer.origin_file_pattern == "tokenizer/"
    assert spec.model.download_source is None  # the library's default, ModelScope, unless the variable says otherwise
    assert (spec.sampler.steps, spec.sampler.cfg_scale, spec.sampler.height, spec.sampler.width) == (30, 4.0, 1328,
                                                                                                     1328)
    assert spec.sampler.scheduler is None and spec.call == {}
    assert spec.vram.name == "none" and not spec.vram.enabled()
    assert spec.lora.items() == []
    assert spec.tracking.backend is TrackingBackend.mlflow and spec.tracking.uri is None
    assert (spec.device, spec.dtype.value, spec.resume) == ("auto", "auto", False)


def test_lightning_sampler_builds_the_lightning_schedule(hydra_ctx):
    import math

    from pipelines import FlowMatchScheduler

    spec = spec_of("sampler=lightning")
    s = spec.sampler
    assert (s.steps, s.cfg_scale) == (8, 1.0)
    arguments = preflight(spec)
    assert arguments["num_inference_steps"] == 8 and arguments["cfg_scale"] == 1.0
    assert arguments["scheduler"] == FlowMatchScheduler.lightning()
    assert arguments["scheduler"].base_shift == math.log(3)


def test_single_lora_strength_is_lora_alpha(hydra_ctx):
    spec = spec_of("lora=artaug", "lora.alpha=0.8")
    [(label, where, item)] = spec.lora.items()
    assert (label, where, item.alpha) == ("artaug", "lora", 0.8)
    assert item.model_id == "DiffSynth-Studio/Qwen-Image-LoRA-ArtAug-v1"
    assert item.origin_file_pattern == "model.safetensors"


def test_several_loras_each_with_its_own_alpha(hydra_ctx, tmp_path):
    extra = tmp_path / "mine.safetensors"
    extra.write_bytes(b"")
    spec = spec_of("lora=stack", "lora.stack.artaug.alpha=0.3", f"+lora.stack.mine.path={extra}",
                   "+lora.stack.mine.alpha=0.7")
    items = {label: item for label, _, item in spec.lora.items()}
    assert items["artaug"].alpha == 0.3 and items["lightning"].alpha == 1.0
    assert items["mine"].path == str(extra) and items["mine"].alpha == 0.7
    validate(spec)


def test_tiny_model_builds_on_first_use(hydra_ctx):
    m = spec_of("model=qwen_image_tiny").model
    assert m.build == "pipelines.testing.tiny.build_tiny_repo" and m.skip_download
    assert {f.model_id for f in m.files} == {"tiny/Qwen-Image-Tiny"}


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    "override,needle",
    [
        ("sampler.stepz=3", "sampler.stepz"),  # misspelt key
        ("sampler.steps=many", "sampler.steps"),  # wrong type
        ("sampler.scheduler=turbo", "sampler.scheduler"),  # not a mapping
        ("dtype=float7", "dtype"),
        ("lora.alpha=strong", "lora.alpha"),
        ("model=qwen_imag", "model"),  # no such preset
    ],
)
def test_bad_override_fails_at_composition_naming_the_path(hydra_ctx, override, needle):
    with pytest.raises(ConfigCompositionException) as err:
        compose("config", overrides=[override])
    text = str(err.value) + str(err.value.__cause__ or "")
    assert needle in text


def test_a_misspelt_yaml_key_fails_with_its_path(hydra_ctx, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("name: typo\nfils: []\n")
    with pytest.raises(ConfigCompositionException, match="model.fils"):
        compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "model=typo"])


@pytest.mark.parametrize(
    "overrides,key,fix",
    [
        (["+sampler.stepz=3"], "sampler.stepz", "did you mean `sampler.steps`"),
        (["+model.files.0.pth=x"], "model.files.0.pth", "model.files.0.path"),
        (["lora=stack", "+lora.stack.mine.alpa=1"], "lora.stack.mine.alpa", "alpha"),
        (["lora=stack", "lora.stack.artaug.alpha=x"], "lora.stack.artaug.alpha", "type"),
    ],
)
def test_added_keys_are_checked_against_the_schema(hydra_ctx, overrides, key, fix):
    with pytest.raises(ConfigError) as err:
        spec_of(*overrides)
    assert err.value.key == key and fix in str(err.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["device=gpu"], "device"),
        (["lora=file"], "lora.path"),
        (["lora=file", "lora.path=/no/such.safetensors"], "lora.path"),
        (["model.files.0.path=/x.safetensors"], "model.files.0"),
        (["vram.offload_dtype=float7"], "vram.offload_dtype"),
        (["vram.vram_limit=lots"], "vram.vram_limit"),
        (["vram.vram_limit=-1"], "vram.vram_limit"),
        (["tracking=none", "resume=true"], "resume"),
    ],
)
def test_bad_values_fail_validation_naming_path_and_fix(hydra_ctx, overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(spec_of(*overrides))
    assert err.value.key == key
    assert "Fix:" in str(err.value)


@pytest.mark.parametrize(
    "overrides,key,needle",
    [
        (["sampler.height=0"], "sampler.height", "positive integer"),
        (["sampler.height=100000", "sampler.width=100000"], "sampler.height", "max_pixels"),
        (["sampler.steps=0"], "sampler.steps", "num_inference_steps"),
        (["sampler.cfg_scale=nan"], "sampler.cfg_scale", "finite"),
        (["call.denoising_strength=1.5"], "call.denoising_strength", "(0, 1]"),
        (["call.exponential_shift_mu=inf"], "call.exponential_shift_mu", "finite"),
        (["call.input_image=/no/such.png"], "call.input_image", "no such file"),
        (["call.tile_size=0"], "call.tile_size", "positive"),
        (["call.denoising_strenght=0.5"], "call.denoising_strenght", "did you mean `call.denoising_strength`"),
        (["call.num_inference_steps=3"], "call.num_inference_steps", "sampler.steps"),
    ],
)
def test_call_arguments_are_checked_by_the_pipeline_before_loading(hydra_ctx, overrides, key, needle):
    spec = spec_of("model=qwen_image_tiny", *overrides)
    validate(spec)
    with pytest.raises(ConfigError) as err:
        preflight(spec)
    assert err.value.key == key and needle in str(err.value)


def test_vram_none_passes_preflight(hydra_ctx):
    preflight(spec_of("model=qwen_image_tiny"))


def test_conf_dir_is_the_repository_conf():
    assert CONF_DIR == Path(__file__).resolve().parent.parent / "conf"


def test_vram_spec_mirrors_every_model_config_key():
    from dataclasses import fields

    from pipelines.core.model_config import VRAM_KEYS
    from runner.spec import VramSpec

    assert set(VRAM_KEYS) <= {f.name for f in fields(VramSpec)}
