"""Loader: recognition, meta-device assignment, and a clear error for every bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipelines.core.download import resolve_files
from pipelines.core.loader import CheckpointError, load_model
from pipelines.core.model_config import ModelConfig
from pipelines.models.qwen2_5_text import QwenImageTextEncoder
from pipelines.models.qwen_image_dit import QwenImageDiT
from pipelines.models.qwen_image_vae import QwenImageVAE
from pipelines.qwen_image import QwenImagePipeline

CANDIDATES = tuple(QwenImagePipeline.components.values())


def load(paths, dtype=torch.float32):
    return load_model(list(paths), CANDIDATES, dtype, "cpu")


def test_each_component_is_recognised_and_loaded_exactly(tiny_repo):
    for folder, cls in (("transformer", QwenImageDiT), ("text_encoder", QwenImageTextEncoder), ("vae", QwenImageVAE)):
        model = load([tiny_repo / folder])
        assert type(model) is cls
        state = model.state_dict()
        assert not any(t.is_meta for t in state.values())
        for file in sorted((tiny_repo / folder).glob("*.safetensors")):
            for key, tensor in load_file(file).items():
                converted = cls.convert_checkpoint_key(key)
                if converted is not None:
                    assert torch.equal(state[converted], tensor), key


def test_text_encoder_skips_lm_head_and_vision_tower(diffusers_repo):
    root, _ = diffusers_repo
    disk_keys = set()
    for file in (root / "text_encoder").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            disk_keys |= set(f.keys())
    assert any(k.startswith("lm_head") for k in disk_keys)
    assert any("visual" in k for k in disk_keys)
    model = load([root / "text_encoder"])
    assert not any("lm_head" in k or "visual" in k for k in model.state_dict())


def test_dtype_cast_and_hyperparameters_inferred_without_config(tiny_repo, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_repo / "transformer", folder)
    (folder / "config.json").unlink()
    model = load([folder], torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16
    assert len(model.transformer_blocks) == 2


def test_shard_list_and_torch_bin(tiny_repo, tmp_path):
    shards = sorted((tiny_repo / "transformer").glob("*.safetensors"))
    from_list = load(shards)
    state = {}
    for shard in shards:
        state.update(load_file(shard))
    torch.save(state, tmp_path / "dit.bin")
    from_bin = load([tmp_path / "dit.bin"])
    for key, tensor in from_list.state_dict().items():
        assert torch.equal(tensor, from_bin.state_dict()[key])


# ---------------------------------------------------------------- bad input


def test_unknown_checkpoint_shows_its_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: unknown checkpoint.*conv1\.weight"):
        load([path])


def test_missing_key_is_named(tiny_repo, tmp_path):
    state = load_file(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")
    dropped = "decoder.conv_out.bias"
    del state[dropped]
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=rf"lacks 1 key\(s\): {dropped}"):
        load([tmp_path / "vae.safetensors"])


def test_unexpected_key_is_named(tiny_repo, tmp_path):
    state = load_file(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")
    state["decoder.extra.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"do not belong to QwenImageVAE: decoder\.extra\.weight"):
        load([tmp_path / "vae.safetensors"])


def test_shape_mismatch_names_file_key_and_shapes(tiny_repo, tmp_path):
    state = load_file(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")
    state["decoder.conv_out.bias"] = torch.ones(4)
    save_file(state, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: 'decoder\.conv_out\.bias' has shape \[4\] "
                                              r"but QwenImageVAE expects \[3\]"):
        load([tmp_path / "vae.safetensors"])


def test_truncated_file(tiny_repo, tmp_path):
    source = tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"
    data = source.read_bytes()
    target = tmp_path / "diffusion_pytorch_model.safetensors"
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: .*truncated or corrupt"):
        load([target])


def test_corrupt_header(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read this checkpoint.*corrupt"):
        load([target])


def test_shard_listed_in_index_but_absent(tiny_repo, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_repo / "transformer", folder)
    missing = sorted(folder.glob("*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) that are not on disk: {missing.name}"):
        load([folder])
    with pytest.raises(CheckpointError, match="not on disk"):
        load(sorted(folder.glob("*.safetensors")))


def test_two_models_given_as_one(tiny_repo):
    files = [sorted((tiny_repo / "transformer").glob("*.safetensors"))[0],
             tiny_repo / "vae" / "diffusion_pytorch_model.safetensors"]
    with pytest.raises(CheckpointError, match="different models.*QwenImageDiT.*QwenImageVAE"):
        load(files)


def test_incomplete_shards_without_index_are_named(tiny_repo, tmp_path):
    first = sorted((tiny_repo / "transformer").glob("*.safetensors"))[0]
    lone = tmp_path / "part.safetensors"
    shutil.copy(first, lone)
    with pytest.raises(CheckpointError, match="lacks"):
        load([lone])


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a checkpoint file"):
        load([path])


def test_model_id_pattern_that_matches_nothing_names_folder_and_pattern(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    config = ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/*.safetensors")
    with pytest.raises(FileNotFoundError, match=r"'vae/\*\.safetensors' in .*Qwen/Qwen-Image"):
        resolve_files(config)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        resolve_files(ModelConfig(path=tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="either path"):
        ModelConfig()


def test_local_model_path_wins_over_the_variable(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    base = tiny_repo.parent.parent
    config = ModelConfig(model_id=f"tiny/{tiny_repo.name}", origin_file_pattern="tokenizer/",
                         local_model_path=base)
    assert resolve_files(config) == [tiny_repo / "tokenizer"]


def test_config_json_that_disagrees_with_the_weights(tiny_repo, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(tiny_repo / "vae", folder)
    config = json.loads((folder / "config.json").read_text())
    config["base_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: '.*' has shape \[.*\] "
                                              r"but QwenImageVAE expects .*config\.json"):
        load([folder])


def test_stray_key_in_a_text_encoder_checkpoint_is_named(tiny_repo, tmp_path):
    state = {}
    for shard in sorted((tiny_repo / "text_encoder").glob("*.safetensors")):
        state.update(load_file(shard))
    state["rotary.cache"] = torch.ones(2)
    save_file(state, str(tmp_path / "te.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 key\(s\) do not belong to QwenImageTextEncoder: rotary\.cache"):
        load([tmp_path / "te.safetensors"])


def test_legacy_torch_pickle(tiny_repo, tmp_path):
    state = load_file(tiny_repo / "vae" / "diffusion_pytorch_model.safetensors")
    torch.save(state, tmp_path / "vae.pt", _use_new_zipfile_serialization=False)
    model = load([tmp_path / "vae.pt"])
    assert torch.equal(model.state_dict()["decoder.conv_out.bias"], state["decoder.conv_out.bias"])


def test_loaded_and_managed_weights_are_host_aligned(tiny_repo, monkeypatch):
    """safetensors puts tensors wherever its header ends (8-byte steps); CPU GEMM kernels pick
    their code path by operand alignment, so weights computed from in place would differ in the
    last bits from the same weights in ordinary memory (seen as ~3e-6 on a fresh machine)."""
    from pipelines.core import vram
    from pipelines.core.reads import HOST_ALIGNMENT
    from pipelines.core.shards import safetensors_layout

    file = next((tiny_repo / "transformer").glob("*.safetensors"))
    offsets = [offset for _, offset, _ in safetensors_layout(file).values()]
    assert any(o % HOST_ALIGNMENT for o in offsets)  # the file really holds misaligned tensors
    model = load([tiny_repo / "transformer"])
    assert all(p.data_ptr() % HOST_ALIGNMENT == 0 for p in model.parameters())
    settings = vram.VramSettings.from_keys(dict(offload_device="disk", onload_device="disk"), torch.float32, "cpu")
    managed = vram.load_managed([tiny_repo / "transformer"], CANDIDATES, settings)
    seen = []
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        seen.append(weight)
        return linear(x, weight, bias)

    vram.manager_of(managed).onload()
    monkeypatch.setattr(torch.nn.modules.linear.F, "linear", recording)
    try:
        managed.img_in(torch.zeros(1, managed.params.in_channels))  # read from the file for this forward
    finally:
        monkeypatch.undo()
        vram.manager_of(managed).offload()
    assert len(seen) == 1 and seen[0].device.type == "cpu" and seen[0].data_ptr() % HOST_ALIGNMENT == 0


# ---------------------------------------------------------------- shards of one checkpoint


@pytest.fixture(scope="module")
def other_transformer(tiny_repo, tmp_path_factory):
    """A second checkpoint of the same architecture (other random weights), sharded and indexed
    the same way as the tiny repo's transformer: its shards have the same names and keys."""
    from pipelines.demo.checkpoints import random_state_dict, save_sharded

    state = {}
    for shard in sorted((tiny_repo / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    folder = tmp_path_factory.mktemp("other") / "transformer"
    save_sharded(random_state_dict({k: tuple(v.shape) for k, v in state.items()}, seed=99), folder,
                 "diffusion_pytorch_model", 2)
    return folder


def test_shards_of_two_checkpoints_are_refused_naming_both(tiny_repo, other_transformer):
    """Shard 1 of one checkpoint and shard 2 of another, each beside its own index (the same
    weight map: the index alone could not tell) load as one model no more."""
    mine, theirs = sorted((tiny_repo / "transformer").glob("*.safetensors")), sorted(other_transformer.glob("*.s*s"))
    with pytest.raises(CheckpointError, match=rf"{mine[0]} and {theirs[1]} are shards of two checkpoints"):
        load([mine[0], theirs[1]])
    assert torch.equal(load(theirs).img_in.weight, load_file(theirs[0])["img_in.weight"])  # one checkpoint loads


def test_a_shard_the_index_does_not_list_or_that_holds_other_keys_is_refused(tiny_repo, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_repo / "transformer", folder)
    shards = sorted(folder.glob("*.safetensors"))
    stale = folder / "diffusion_pytorch_model-00001-of-00003.safetensors"  # an older download's sharding
    shutil.copy(shards[0], stale)
    with pytest.raises(CheckpointError, match=rf"{stale.name} is not listed in the shard index .*index\.json"):
        load(sorted(folder.glob("*.safetensors")))
    stale.unlink()
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = next(k for k, name in index["weight_map"].items() if name == shards[0].name)
    index["weight_map"][moved] = shards[1].name  # the index says the key lives in the other shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"({shards[0].name} holds '{moved}', which the index puts in "
                                              rf"{shards[1].name}|{shards[1].name} lacks '{moved}', which the index "
                                              r"puts in it).*different checkpoints"):
        load([folder])


def test_shards_whose_metadata_disagree_are_refused(tiny_repo, tmp_path):
    """Without an index: safetensors metadata the files share must agree (a training tool's
    fields, the format). Two same-architecture checkpoints written alike cannot be told apart."""
    state = {}
    for shard in sorted((tiny_repo / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    keys = sorted(state)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: state[k] for k in keys[:10]}, str(first), metadata={"format": "pt", "ss_output_name": "fox"})
    save_file({k: state[k] for k in keys[10:]}, str(second), metadata={"format": "pt", "ss_output_name": "cat"})
    with pytest.raises(CheckpointError, match=r"a\.safetensors and .*b\.safetensors disagree on their metadata "
                                              r"'ss_output_name' \('fox' vs 'cat'\)"):
        load([first, second])
    save_file({k: state[k] for k in keys[10:]}, str(second), metadata={"format": "pt", "ss_output_name": "fox"})
    assert torch.equal(load([first, second]).img_in.weight, state["img_in.weight"])
