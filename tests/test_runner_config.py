"""The config tree: every group and preset composes into a valid spec; bad keys and values
fail before any weight is loaded, naming the config path."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from runner.build import pipeline as build
from runner.build.arguments import preflight
from runner.config import CONF_DIR
from runner.config.checks import to_spec, validate
from runner.config.schema import RunSpec, TrackingBackend, register_configs
from runner.errors import ConfigError

register_configs()
build.register_resolvers()  # ${built_file:...} (conf/lora/tiny_demo.yaml)

GROUPS = ("model", "vram", "lora", "sampler", "tracking", "controlnet")
PICTURE = str(Path(__file__).resolve().parent.parent / "pipelines" / "demo" / "pictures" / "a.png")


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
    assert {"default", "lightning", "qwen_image_2_1"} <= set(options("sampler"))
    assert {"qwen_image_2_1", "qwen_image_2_1_tiny"} <= set(options("model"))
    assert set(options("tracking")) == {"mlflow", "none"}
    assert set(options("controlnet")) == {"none", "union", "inpainting", "blockwise_canny", "blockwise_depth",
                                          "blockwise_inpaint", "tiny_demo"}


def test_controlnet_presets_name_the_published_nets_and_become_call_arguments(hydra_ctx):
    """Hub ids of the issue (ModelScope unless the model says otherwise); the conditions become the
    pipeline's `controlnet_inputs` (pipelines.ControlNetInput), the files more ModelConfigs of the model."""
    from pipelines import ControlNetInput

    expected = {"union": "InstantX/Qwen-Image-ControlNet-Union",
                "inpainting": "InstantX/Qwen-Image-ControlNet-Inpainting",
                "blockwise_canny": "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny",
                "blockwise_depth": "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth",
                "blockwise_inpaint": "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint"}
    for option, model_id in expected.items():
        c = spec_of(f"controlnet={option}").controlnet
        assert [f.model_id for f in c.files] == [model_id] and c.download_source is None
    spec = spec_of("controlnet=blockwise_inpaint", f"controlnet.image={PICTURE}", f"controlnet.mask={PICTURE}",
                   "controlnet.scale=0.7", "controlnet.end=0.2",
                   f"controlnet.inputs=[{{image:'{PICTURE}',start:0.5}}]")
    validate(spec)
    arguments = preflight(spec)
    assert arguments["controlnet_inputs"] == [
        ControlNetInput(image=PICTURE, inpaint_mask=PICTURE, scale=0.7, end=0.2),
        ControlNetInput(image=PICTURE, start=0.5)]
    configs, _, _ = build.model_configs(spec, build.resolve_runtime(spec))
    assert [c.model_id for c in configs][-1] == "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint"
    assert len(configs) == len(spec.model.files) + 1
    assert spec_of("controlnet=none").controlnet.conditions() == []
    assert "controlnet_inputs" not in preflight(spec_of("controlnet=none"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_preset_composes_into_a_typed_spec(hydra_ctx, group, option):
    extra = ["lora.path=" + __file__] if (group, option) == ("lora", "file") else []
    if group == "controlnet" and option not in ("none", "tiny_demo"):  # the control picture is the user's
        extra = [f"controlnet.image={PICTURE}"] + ([f"controlnet.mask={PICTURE}"] if "inpaint" in option else [])
    spec = spec_of(f"{group}={option}", *extra)
    assert isinstance(spec, RunSpec)
    node = getattr(spec, group)
    if hasattr(node, "name"):
        assert node.name == option
    validate(spec)
    if group in ("vram", "controlnet", "model", "sampler"):
        # the library manages VRAM: every preset is accepted; the conditions are its call's; every model's
        # pipeline takes the sampler's arguments
        preflight(spec)


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


def test_qwen_image_21_presets_give_its_defaults_and_its_processor_folder(hydra_ctx):
    """Qwen-Image 2.1 from the hub (ModelScope unless the usual switch says otherwise) with its processor/
    folder and no tokenizer; its sampler preset: 40 steps, guidance off, the size from the pipeline."""
    from pipelines import QwenImage21Pipeline

    spec = spec_of("model=qwen_image_2_1", "sampler=qwen_image_2_1")
    m = spec.model
    assert {f.model_id for f in m.files} == {"Qwen/Qwen-Image-2.1"} and m.download_source is None
    assert (m.tokenizer, m.processor.origin_file_pattern, m.build) == (None, "processor/", None)
    assert spec_of("model=qwen_image_2_1", "model.download_source=huggingface").model.download_source == "huggingface"
    validate(spec)
    arguments = preflight(spec)
    assert build.pipeline_class(spec) is QwenImage21Pipeline
    assert (arguments["num_inference_steps"], arguments["cfg_scale"], arguments["height"], arguments["width"]) == (
        40, 1.0, None, None)
    tiny = spec_of("model=qwen_image_2_1_tiny").model
    assert tiny.build == "pipelines.demo.qwen_image_21_tiny.build" and tiny.skip_download and tiny.tokenizer is None
    assert {f.model_id for f in tiny.files} == {tiny.processor.model_id} == {"tiny/Qwen-Image-2.1-Tiny"}


@pytest.mark.parametrize("overrides,key,needle", [
    ([f"call.edit_image=[{PICTURE},/no/such.png]"], "call.edit_image[1]", "no such file"),
    ([f"call.edit_image=[{PICTURE},{__file__}]"], "call.edit_image[1]", "not a readable image"),
    (["call.sigmas=[1.0,0.5,0.7]"], "call.sigmas[1]", "decrease"),
    (["call.sigmas=[1.0,nan]"], "call.sigmas[1]", "finite"),
    (["call.output_resolution=0"], "call.output_resolution", "output_resolution"),
    (["call.denoising_strength=0.5"], "call.denoising_strength", "takes no argument"),
])
def test_qwen_image_21_arguments_are_refused_at_their_key_before_loading(hydra_ctx, overrides, key, needle):
    spec = spec_of("model=qwen_image_2_1", "sampler=qwen_image_2_1", *overrides)
    validate(spec)
    with pytest.raises(ConfigError) as err:
        preflight(spec)
    assert err.value.key == key and needle in str(err.value) and "Fix:" in str(err.value)


def test_qwen_image_21_takes_a_sigma_grid_by_call_sigmas(hydra_ctx):
    """A distilled grid (a Turbo's `sample_sigmas`) given by hand: it sets the steps."""
    arguments = preflight(spec_of("model=qwen_image_2_1", "sampler=qwen_image_2_1", "call.sigmas=[1.0,0.75,0.4]"))
    assert list(arguments["sigmas"]) == [1.0, 0.75, 0.4]


def test_tiny_model_builds_on_first_use(hydra_ctx):
    m = spec_of("model=qwen_image_tiny").model
    assert m.build == "pipelines.demo.qwen_image_tiny.build_tiny_repo" and m.skip_download
    assert {f.model_id for f in m.files} == {"tiny/Qwen-Image-Tiny"}


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    "override,key,fix",
    [
        ("sampler.stepz=3", "sampler.stepz", "did you mean `sampler.steps`?"),  # misspelt key
        ("sampler.steps=many", "sampler.steps", "give an integer"),  # wrong type
        ("sampler.scheduler=turbo", "sampler.scheduler", "give a mapping (sampler.scheduler.NAME=value) or null"),
        ("dtype=float7", "dtype", "use one of auto, float32, bfloat16, float16"),
        ("lora.alpha=strong", "lora.alpha", "give a number"),
        ("model=qwen_imag", "model", "did you mean model=qwen_image?"),  # no such preset
        ("model.files.0.pth=x", "model.files.0.pth", "did you mean `model.files.0.path`?"),
        ("seed=[1", "seed", "quote a value"),  # does not parse
    ],
)
def test_bad_override_fails_at_composition_naming_the_path(hydra_ctx, override, key, fix):
    """Hydra's own text echoes the override; ours names the key and the fix."""
    from hydra.errors import HydraException

    from runner.config.compose import composition_error

    with pytest.raises(HydraException) as err:
        compose("config", overrides=[override])
    error = composition_error(err.value, [override])
    assert isinstance(error, ConfigError) and error.key == key
    assert f"Fix: {fix}" in str(error), str(error)


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
        # a misspelt sampler argument: the key that sets it, at once (call.cfg_scale is refused)
        (["call.cfg_sclae=3"], "call.cfg_sclae", "did you mean `sampler.cfg_scale`?"),
        (["call.steps=3"], "call.steps", "did you mean `sampler.steps`?"),
        (["call.promt=a cat"], "call.promt", "did you mean `prompt`?"),
        # a picture path YAML reads as a number: the library's TypeError, at its key
        (["call.input_image=5"], "call.input_image", "call.input_image='5'"),
        (["call.edit_image=[5]"], "call.edit_image[0]", "call.edit_image=['5']"),
        # inpainting without a ControlNet: the mask with the picture it repaints
        ([f"call.inpaint_mask={PICTURE}"], "call.inpaint_mask", "needs input_image"),
        ([f"call.input_image={PICTURE}", "call.inpaint_mask=/no/mask.png"], "call.inpaint_mask", "no such file"),
        ([f"call.input_image={PICTURE}", f"call.inpaint_mask={PICTURE}", "call.inpaint_blur_size=2"],
         "call.inpaint_blur_size", "go together"),
    ],
)
def test_call_arguments_are_checked_by_the_pipeline_before_loading(hydra_ctx, overrides, key, needle):
    spec = spec_of("model=qwen_image_tiny", *overrides)
    validate(spec)
    with pytest.raises(ConfigError) as err:
        preflight(spec)
    assert err.value.key == key and needle in str(err.value)


@pytest.mark.parametrize("overrides,key,needle", [
    (["controlnet=union"], "controlnet.image", "given no control picture"),
    (["controlnet=tiny_demo", "controlnet.image=/no/such.png"], "controlnet.image", "/no/such.png"),
    (["controlnet=tiny_demo", "controlnet.scale=nan"], "controlnet.scale", "finite"),
    (["controlnet=tiny_demo", "controlnet.start=0.2", "controlnet.end=0.8"], "controlnet", "0 <= end <= start <= 1"),
    (["controlnet=tiny_demo", f"controlnet.inputs=[{{image:'{PICTURE}',controlnet_id:1}}]"],
     "controlnet.inputs.0.controlnet_id", "1 are loaded"),
    (["controlnet=tiny_demo", f"controlnet.inputs=[{{image:'{PICTURE}'}},{{image:'{PICTURE}',mask:/no/m.png}}]"],
     "controlnet.inputs.1.mask", "/no/m.png"),
    (["controlnet=tiny_demo", "controlnet.inputs=[{scale:0.5}]"], "controlnet.inputs.0", "has no picture"),
    ([f"controlnet.image={PICTURE}"], "controlnet.image", "no ControlNet is loaded"),
    (["controlnet=tiny_demo", f"+call.controlnet_inputs=[{PICTURE}]"], "call.controlnet_inputs", "controlnet.image"),
    (["controlnet=tiny_demo", "controlnet.files.0.path=/no/net.safetensors"], "controlnet.files.0.path",
     "no such file"),
    (["controlnet=union", f"controlnet.image={PICTURE}", "controlnet.files.0.model_id=../x"],
     "controlnet.files.0.model_id", ".."),
])
def test_controlnet_settings_are_refused_at_their_key_before_loading(hydra_ctx, overrides, key, needle):
    with pytest.raises(ConfigError) as err:
        spec = spec_of("model=qwen_image_tiny", *overrides)
        validate(spec)
        preflight(spec)
    assert err.value.key == key and needle in str(err.value) and "Fix:" in str(err.value)


def test_the_pipeline_cache_and_job_identity_follow_the_controlnet(hydra_ctx, tmp_path, monkeypatch):
    """Another ControlNet preset is another loaded pipeline; another scale or picture is the same one.
    The control picture is hashed into the job's identity: rewritten in place, the job is another."""
    from runner.execution import job
    from runner.execution.warm import folder as warm

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    picture = tmp_path / "edges.png"
    shutil.copyfile(PICTURE, picture)

    def key(*overrides):
        spec = spec_of("model=qwen_image_tiny", *overrides)
        return build.cache_key(spec, build.resolve_runtime(spec))

    demo = key("controlnet=tiny_demo")
    assert demo == key("controlnet=tiny_demo", "controlnet.scale=0.3", f"controlnet.image={picture}")
    assert demo != key("controlnet=none") != key("controlnet=blockwise_canny", f"controlnet.image={picture}")
    assert key("controlnet=blockwise_canny", f"controlnet.image={picture}") != key(
        "controlnet=blockwise_depth", f"controlnet.image={picture}")

    def identity(*overrides):
        cfg = compose("config", overrides=["model=qwen_image_tiny", "device=cpu", "controlnet=tiny_demo",
                                           f"controlnet.image={picture}", f"tracking.store_dir={tmp_path / 'store'}",
                                           *overrides])
        plan = job.prepare(cfg)
        return plan.config_hash, job.file_identity(plan.spec, preflight(plan.spec))["sha256"], warm.identity(plan)

    before, hashed, worker = identity()
    assert set(hashed) == {"controlnet.image"}
    both = identity(f"+call.input_image={PICTURE}", f"+call.inpaint_mask={picture}", "call.denoising_strength=0.9")
    assert set(both[1]) == {"controlnet.image", "call.input_image", "call.inpaint_mask"}  # an inpainting mask too
    Image.open(PICTURE).rotate(90).save(picture)
    after, rehashed, same_worker = identity("controlnet.scale=0.5")
    assert after != before and rehashed["controlnet.image"] != hashed["controlnet.image"]
    assert same_worker.digest == worker.digest  # a warm worker keeps the pipeline for another picture or scale
    assert identity("controlnet=blockwise_canny")[2].digest != worker.digest


def test_vram_none_passes_preflight(hydra_ctx):
    spec = spec_of("model=qwen_image_tiny")
    assert not spec.vram.enabled()
    arguments = preflight(spec)
    assert arguments["num_inference_steps"] == spec.sampler.steps and arguments["seed"] == 0
    assert arguments["prompt"] == spec.prompt and arguments["height"] == 1328


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["seed=-1"], "seed"),
        (["seed=18446744073709551616"], "seed"),  # 2**64
        (["device=mps"], "device"),
        (["tracking.uri=file:///tmp/store"], "tracking.uri"),
        (["tracking.uri=ftp://host/x"], "tracking.uri"),
        (["report.thumb=0"], "report.thumb"),
        (["tracking.image_key=a*b"], "tracking.image_key"),
        (["tracking.request_timeout_s=nan"], "tracking.request_timeout_s"),
        (["tracking.request_timeout_s=0"], "tracking.request_timeout_s"),
        (["tracking.request_retries=11"], "tracking.request_retries"),
        (["lora=stack", "lora.stack.artaug.alpha=inf"], "lora.stack.artaug.alpha"),
        (["vram.vram_limit=nan"], "vram.vram_limit"),
        (["experiment="], "experiment"),  # MLflow refuses it, once the weights are loaded
        ([f"tracking.store_dir={__file__}"], "tracking.store_dir"),  # a file: no store can be made there
        ([f"tracking.store_dir={__file__}/store"], "tracking.store_dir"),
    ],
)
def test_values_that_cannot_work_are_refused_before_any_weight(hydra_ctx, overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(spec_of("model=qwen_image_tiny", *overrides))
    assert err.value.key == key and "Fix:" in str(err.value)


@pytest.mark.parametrize("make, key, needle", [
    (lambda p: None, "model.files.0.path", "no such file"),
    (lambda p: os.mkfifo(p), "model.files.0.path", "FIFO"),  # its reader would wait forever
    (lambda p: None, "lora.path", "no such file"),
    (lambda p: os.mkfifo(p), "lora.path", "FIFO"),
    (lambda p: p.mkdir(), "lora.path", "folder"),  # where a LoRA file is taken
])
def test_local_files_a_run_names_are_checked_before_any_weight(hydra_ctx, tmp_path, make, key, needle):
    path = tmp_path / "weights.safetensors"
    make(path)
    override = f"model.files=[{{path:'{path}'}}]" if key.startswith("model") else f"lora.path={path}"
    with pytest.raises(ConfigError) as err:
        validate(spec_of("model=qwen_image_tiny", "lora=file", override))
    assert err.value.key == key and str(path) in str(err.value) and needle in err.value.problem


@pytest.mark.parametrize("override,key,fix", [
    ("sampler.steps=${nope}", "sampler.steps", "name a key the config has"),
    ("call.tiled=${oc.env:RUNNER_TEST_UNSET}", "call.tiled", "set that environment variable"),
    ("sampler.steps=${oc.env:HOME}", "sampler.steps", "give a value of the key's type"),
    ("lora.alpha=${sampler.nope}", "lora.alpha", "name a key the config has"),
])
def test_an_interpolation_that_does_not_resolve_is_refused_at_its_key(hydra_ctx, monkeypatch, override, key, fix):
    monkeypatch.delenv("RUNNER_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        spec_of(override)
    assert err.value.key == key and fix in err.value.fix


def test_prompts_arrive_as_typed_without_interpolation(hydra_ctx, monkeypatch):
    """A prompt is text for the model, not config: `${...}` in it is kept (in the spec, the
    resolved config that job.json, config.yaml and the params hold, and the hash)."""
    from runner.execution.job import plain_config

    monkeypatch.setenv("RUNNER_TEST_SECRET", "leaked")
    prompt, negative = "a ${oc.env:RUNNER_TEST_SECRET} fox with ${nope} and \\${x}", "no ${oc.env:HOME}"
    cfg = compose("config", overrides=[f"prompt={prompt}", f"negative_prompt={negative}",
                                       "experiment=${oc.env:RUNNER_TEST_SECRET}"])
    spec = to_spec(cfg)
    assert (spec.prompt, spec.negative_prompt) == (prompt, negative)
    assert spec.experiment == "leaked"  # any other key is config: its interpolations resolve
    resolved = plain_config(cfg)
    assert (resolved["prompt"], resolved["negative_prompt"], resolved["experiment"]) == (prompt, negative, "leaked")
    assert cfg._get_node("prompt")._value() == prompt


def test_cuda_without_cuda_is_refused_by_the_library_parser(hydra_ctx):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available") as err:
        validate(spec_of("model=qwen_image_tiny", "device=cuda"))
    assert err.value.key == "device"


@pytest.mark.parametrize("field", ["base_shift", "max_shift"])
def test_a_non_finite_scheduler_field_is_refused_naming_it(hydra_ctx, field):
    spec = spec_of("model=qwen_image_tiny", "sampler=lightning", f"sampler.scheduler.{field}=nan")
    validate(spec)
    with pytest.raises(ConfigError, match="finite") as err:
        preflight(spec)
    assert err.value.key == f"sampler.scheduler.{field}"


def test_config_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("seed", "bad", "fix it")))
    assert (error.key, str(error)) == ("seed", "config `seed`: bad. Fix: fix it")


def test_conf_dir_is_the_repository_conf():
    assert CONF_DIR == Path(__file__).resolve().parent.parent / "conf"


def test_vram_spec_mirrors_every_model_config_key():
    from dataclasses import fields

    from pipelines.core.model_config import VRAM_KEYS
    from runner.config.schema import VramSpec

    assert set(VRAM_KEYS) <= {f.name for f in fields(VramSpec)}


COMPOSED_SWEEPS = [  # each job's overrides, as the sweeper expands them
    [["seed=0"], ["seed=1"], ["seed=2"]],
    [["model=qwen_image_tiny", "lora=tiny_demo", "lora.alpha=0.5", "seed=3"],
     ["model=qwen_image_tiny", "lora=tiny_demo", "lora.alpha=1.0", "seed=3"],
     ["model=qwen_image_tiny", "lora=none", "seed=3"]],
    [["sampler=tiny", "sampler.steps=2", "+call.tiled=true"],
     ["sampler=default", "sampler.steps=3", "+call.tiled=true"],
     ["sampler=tiny", "sampler.steps=4", "call={}"]],
    [["vram=disk", "hydra.job.name=a", "prompt=a cat"], ["vram=none", "hydra.job.name=b", "prompt='a, dog'"]],
    [["controlnet=tiny_demo", "controlnet.scale=0"], ["controlnet=tiny_demo", "controlnet.scale=1"],
     ["controlnet=none", "seed=1"]],
]


@pytest.mark.parametrize("jobs", COMPOSED_SWEEPS, ids=["values", "groups+values", "added keys", "hydra keys",
                                                   "controlnet"])
def test_the_sweep_composer_gives_each_job_hydras_own_composition(hydra_ctx, jobs):
    """The runner composes a job whose config groups an earlier job had by applying its values
    to a copy: every job's whole config (hydra node included) equals Hydra's composition."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.config.compose import Composer

    master = compose("config", overrides=["hydra.sweep.dir=/tmp/sweep", "hydra.job.chdir=false"],
                     return_hydra_config=True)
    loader = GlobalHydra.instance().hydra.config_loader
    composer = Composer(master)
    for overrides in jobs + jobs:  # the second round reuses every composition
        ours = OmegaConf.to_container(composer(overrides), resolve=False)
        hydras = OmegaConf.to_container(loader.load_sweep_config(master, overrides), resolve=False)
        assert ours == hydras, overrides
    groups = {tuple(o for o in job if o.split("=")[0].lstrip("+") in ("model", "lora", "sampler", "vram", "controlnet")
                    or o.startswith("hydra.")) for job in jobs}
    assert len(composer.bases) == len(groups)  # Hydra composed once per combination of groups


def test_the_sweep_composer_parses_each_override_once(hydra_ctx, monkeypatch):
    """Hydra's override parser (~0.5 ms an override) reads each distinct override of a sweep
    once: the command line's overrides that every job repeats are not parsed again per job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from runner.config.compose import Composer

    parsed = []
    original = OverridesParser.parse_overrides

    def counted(self, overrides):
        parsed.extend(overrides)
        return original(self, overrides)

    master = compose("config", overrides=["hydra.sweep.dir=/tmp/sweep"], return_hydra_config=True)
    monkeypatch.setattr(OverridesParser, "parse_overrides", counted)
    composer = Composer(master)
    shared = ["model=qwen_image_tiny", "sampler=tiny", "sampler.steps=2", "prompt=a fox"]
    seeds = [f"seed={seed}" for seed in range(4)]
    configs = [composer([*shared, seed]) for seed in seeds]
    assert [c.seed for c in configs] == [0, 1, 2, 3]
    # each once; a group choice once more by Hydra's one composition of the groups
    assert {o: parsed.count(o) for o in shared + seeds} == {o: 2 if o in shared[:2] else 1 for o in shared + seeds}
