"""Parity of pipelines.models.qwen_image_21_dit with diffusers' QwenImage21Transformer2DModel on tiny random
checkpoints written by diffusers' own save_pretrained (sharded, as on the hub) and loaded through our loader (CPU,
float32); its KV cache; the full-size keys on the meta device; telling a 2.1 checkpoint from a Qwen-Image 1.x one."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipelines.core.loader import CheckpointError, load_model
from pipelines.models.qwen_image_21_dit import KVCache, PromptInput, QwenImage21DiT, QwenImage21DiTParams
from pipelines.models.qwen_image_dit import QwenImageDiT
from pipelines.qwen_image import QwenImagePipeline
from tests.support.weights import randomize_

diffusers = pytest.importorskip("diffusers")

TINY = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, context_in_dim=24, mlp_ratio=3, axes_dims_rope=(4, 14, 14))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """causal_condition -> (diffusers' model, ours loaded by the loader from the folder diffusers wrote, the folder)."""
    made = {}

    def get(causal_condition: bool = True):
        if causal_condition not in made:
            ref = diffusers.QwenImage21Transformer2DModel(**TINY, causal_condition=causal_condition)
            randomize_(ref, seed=1 + causal_condition).eval()
            folder = tmp_path_factory.mktemp("qwen_image_21") / "transformer"
            ref.save_pretrained(folder, max_shard_size="200KB")
            assert len(list(folder.glob("*.safetensors"))) > 1  # sharded, with an index
            made[causal_condition] = ref, load_model([folder], [QwenImage21DiT], torch.float32, "cpu"), folder
        return made[causal_condition]

    return get


def make_case(spec: list, target: tuple[int, int], batch: int = 1, seed: int = 0, valid=None) -> dict:
    """A prompt: ints are runs of text tokens, (h, w) a reference picture (h * w / 4 vision slots). `valid`:
    (batch, Lt) bool mask (padding), None = no mask."""
    slots, references = [], []
    for item in spec:
        if isinstance(item, int):
            slots += [False] * item
        else:
            slots += [True] * (item[0] * item[1] // 4)
            references.append(item)
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in references)
    return dict(
        text=torch.randn(batch, len(slots), TINY["context_in_dim"], generator=gen),
        text_mask=valid,
        image_slots=torch.tensor(slots),
        references=references,
        reference_latents=torch.randn(batch, tokens, TINY["in_channels"], generator=gen) if references else None,
        latents=torch.randn(batch, target[0] * target[1], TINY["in_channels"], generator=gen),
        height=target[0], width=target[1])


def run_ours(model: QwenImage21DiT, case: dict, sigma: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(case["latents"], sigma, case["text"], case["text_mask"], case["height"], case["width"],
                     image_slots=case["image_slots"], references=case["references"],
                     reference_latents=case["reference_latents"], cache=cache)


def run_reference(ref, case: dict, sigma: torch.Tensor) -> torch.Tensor:
    """As diffusers' QwenImage21Pipeline calls it: pictures then target in one tensor, the target's slots
    appended to the image mask, no KV cache; the target's tokens are the last ones."""
    latents, batch = case["latents"], case["latents"].shape[0]
    target = latents.shape[1]
    hidden = latents if case["reference_latents"] is None else torch.cat([case["reference_latents"], latents], 1)
    img_mask = torch.cat([case["image_slots"][None].expand(batch, -1),
                          torch.ones(batch, target // 4, dtype=torch.bool)], dim=1)
    shapes = [[(1, h, w) for h, w in case["references"]] + [(1, case["height"], case["width"])]] * batch
    with torch.no_grad():
        out = ref(hidden_states=hidden, encoder_hidden_states=case["text"], timestep=sigma, img_shapes=shapes,
                  img_mask=img_mask, encoder_hidden_states_mask=case["text_mask"], return_dict=False)[0]
    return out[:, -target:]


def assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    scale = expected.abs().max().item()
    assert scale > 1e-2 and expected.std().item() > 1e-3, "degenerate reference output"
    err = (ours - expected).abs().max().item()
    assert err <= 1e-5 * max(1.0, scale), f"max abs error {err:.3g} at output scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("target", [(4, 4), (2, 6), (6, 4)])
def test_text_to_image(checkpoint, target):
    ref, ours, _ = checkpoint()
    case = make_case([9], target, seed=1)
    out = run_ours(ours, case, torch.tensor([0.8]))
    assert out.shape == (1, target[0] * target[1], TINY["out_channels"])
    assert_close(out, run_reference(ref, case, torch.tensor([0.8])))


@pytest.mark.parametrize("spec,target", [
    ([3, (4, 4), 5], (4, 6)),                  # one picture, non-square target
    ([2, (4, 4), 1, (2, 6), 4], (6, 4)),       # two pictures of different sizes
    ([2, (2, 2), (4, 2), 3], (2, 4)),          # adjacent pictures: two blocks, told apart by their token counts
])
def test_reference_pictures(checkpoint, spec, target):
    ref, ours, _ = checkpoint()
    case = make_case(spec, target, seed=2)
    assert_close(run_ours(ours, case, torch.tensor([0.6])), run_reference(ref, case, torch.tensor([0.6])))


def test_padded_batch(checkpoint):
    """Two prompts of different lengths, padded on the right as diffusers' pipeline pads them (the picture first,
    at the same positions in both); and a text-only batch padded on the left."""
    ref, ours, _ = checkpoint()
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False
    case = make_case([2, (4, 4), 6], (4, 4), batch=2, seed=3, valid=valid)
    sigma = torch.tensor([0.9, 0.4])
    assert_close(run_ours(ours, case, sigma), run_reference(ref, case, sigma))

    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :3] = False
    case = make_case([8], (2, 4), batch=2, seed=4, valid=valid)
    assert_close(run_ours(ours, case, sigma), run_reference(ref, case, sigma))


def test_without_causal_condition(checkpoint):
    ref, ours, _ = checkpoint(causal_condition=False)
    assert ours.params.causal_condition is False  # from config.json
    case = make_case([3, (4, 4), 2, (2, 2), 4], (4, 2), seed=5)
    assert_close(run_ours(ours, case, torch.tensor([0.5])), run_reference(ref, case, torch.tensor([0.5])))


def test_bfloat16(checkpoint):
    """Both loaded in bfloat16 (diffusers' from_pretrained keeps its timestep frequencies in float32, as we compute
    them): the same roundings (bitwise equal on this CPU), within one bfloat16 step of each other."""
    _, _, folder = checkpoint()
    ref = diffusers.QwenImage21Transformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ours = load_model([folder], [QwenImage21DiT], torch.bfloat16, "cpu")
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False
    case = make_case([2, (4, 4), 6], (4, 4), batch=2, seed=10, valid=valid)
    case = {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in case.items()}
    sigma = torch.tensor([0.7, 0.7])
    out, expected = run_ours(ours, case, sigma), run_reference(ref, case, sigma)
    assert out.dtype == expected.dtype == torch.bfloat16 and expected.float().std() > 1e-2
    assert (out.float() - expected.float()).abs().max() <= 8e-3 * expected.float().abs().max()


# ---------------------------------------------------------------------------------------------------- KV cache


def test_kv_cache_across_steps(checkpoint):
    """The cache is filled at the first step and read at the next: the same output as without it, bitwise, and
    diffusers' (uncached) at both steps; the prefix is not computed again."""
    ref, ours, _ = checkpoint()
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[0, 11:] = False
    case = make_case([2, (4, 4), 1, (2, 6), 4], (4, 4), batch=2, seed=6, valid=valid)
    cache, text_projections = KVCache(), []
    handle = ours.txt_in.register_forward_hook(lambda *_: text_projections.append(1))
    try:
        for sigma in (torch.tensor([0.9, 0.9]), torch.tensor([0.35, 0.35])):
            cached = run_ours(ours, case, sigma, cache)
            assert cache.filled and len(cache.layers) == TINY["num_layers"]
            assert torch.equal(cached, run_ours(ours, case, sigma))
            assert_close(cached, run_reference(ref, case, sigma))
    finally:
        handle.remove()
    assert len(text_projections) == 1 + 2  # the cache's first call, then the two uncached calls


def test_prompts_packed(checkpoint, monkeypatch):
    """Guidance's two prompts (different lengths) in one forward_prompts, at the cache's first step and a later one:
    each as diffusers' gives it and as `forward` gives it alone; with the caches bitwise as without them. Packed,
    each projection multiplies both prompts' prefixes in one product and both targets in one, and the prefix's
    last block computes only its keys and values; beyond `pack_tokens` (40 + 35 tokens here) one prompt at a time."""
    ref, ours, _ = checkpoint()
    a = make_case([3, (4, 4), 5], (4, 4), seed=10)  # prefix 24 tokens, target 16
    b = dict(make_case([2, (4, 4), 1], (4, 4), seed=11), latents=a["latents"], reference_latents=a["reference_latents"])
    layers = {"first q": ours.transformer_blocks[0].attn.to_q, "last q": ours.transformer_blocks[-1].attn.to_q,
              "last k": ours.transformer_blocks[-1].attn.to_k}
    rows = {name: [] for name in layers}
    hooks = [layer.register_forward_hook(lambda _, args, __, name=name: rows[name].append(args[0].shape[1]))
             for name, layer in layers.items()]

    def run(caches, pack_tokens=75):
        monkeypatch.setattr(ours, "pack_tokens", pack_tokens)
        prompts = [PromptInput(c["text"], c["text_mask"], c["image_slots"], cache) for c, cache in zip((a, b), caches)]
        for value in rows.values():
            value.clear()
        with torch.no_grad():
            return ours.forward_prompts(a["latents"], sigma, prompts, 4, 4, a["references"], a["reference_latents"])

    caches = [KVCache(), KVCache()]
    try:
        for step, sigma in enumerate((torch.tensor([0.9]), torch.tensor([0.35]))):
            got = run(caches)
            assert rows == ({"first q": [43, 32], "last q": [32], "last k": [43, 32]} if step == 0 else
                            {"first q": [32], "last q": [32], "last k": [32]})
            for out, case in zip(got, (a, b)):
                assert_close(out, run_reference(ref, case, sigma))
                assert_close(out, run_ours(ours, case, sigma))
            assert all(map(torch.equal, got, run(caches=[None, None])))
            alone = run(caches=[None, None], pack_tokens=74)
            assert rows["first q"] == [24, 16, 19, 16]
            assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(got, alone))
    finally:
        for hook in hooks:
            hook.remove()


def test_kv_cache_refuses_another_prompt_and_a_model_without_causal_condition(checkpoint):
    _, ours, _ = checkpoint()
    case = make_case([3, (2, 2), 3], (2, 2), seed=7)
    cache = KVCache()
    run_ours(ours, case, torch.tensor([0.9]), cache)
    other = dict(case, text=case["text"] + 1)
    moved = make_case([2, (2, 2), 4], (2, 2), seed=7)  # the same text, the picture one token earlier
    for wrong in (other, dict(moved, text=case["text"])):
        with pytest.raises(ValueError, match="another prompt"):
            run_ours(ours, wrong, torch.tensor([0.5]), cache)
    assert torch.equal(run_ours(ours, dict(case, latents=case["latents"][:, :2], width=1), torch.tensor([0.5]), cache),
                       run_ours(ours, dict(case, latents=case["latents"][:, :2], width=1), torch.tensor([0.5])))
    cache.clear()
    run_ours(ours, other, torch.tensor([0.5]), cache)  # cleared: filled again for the other prompt

    _, plain, _ = checkpoint(causal_condition=False)
    with pytest.raises(ValueError, match="causal_condition"):
        run_ours(plain, case, torch.tensor([0.9]), KVCache())


def test_forward_rejects_bad_inputs(checkpoint):
    _, ours, _ = checkpoint()
    case = make_case([3, (4, 4), 2], (2, 2), seed=8)
    sigma = torch.tensor([0.5])
    with pytest.raises(ValueError, match=r"4 vision slots .* make 20"):
        run_ours(ours, dict(case, references=[(4, 5)]), sigma)
    with pytest.raises(ValueError, match="reference_latents must be"):
        run_ours(ours, dict(case, reference_latents=None), sigma)
    interrupted = case["image_slots"].clone()
    interrupted[4], interrupted[7] = False, True  # the picture's 4 slots, with a text token among them
    with pytest.raises(ValueError, match="consecutive vision slots"):
        run_ours(ours, dict(case, image_slots=interrupted), sigma)
    two = make_case([3, (4, 4), 2], (2, 2), batch=2, seed=8)
    with pytest.raises(ValueError, match="differ between the samples"):
        run_ours(ours, dict(two, image_slots=torch.stack([case["image_slots"], interrupted])), sigma)
    with pytest.raises(ValueError, match=r"target grid 2x3 makes 6"):
        run_ours(ours, dict(case, width=3), sigma)


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_full_size_keys_and_shapes_on_meta():
    """diffusers' default config (the published model's) on the meta device: ours has the same keys and shapes,
    from config.json or from the shapes alone, and claims every key."""
    with torch.device("meta"):
        ref = diffusers.QwenImage21Transformer2DModel()
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert all(QwenImage21DiT.owns_checkpoint_key(k) for k in shapes)
    for config in (dict(ref.config), None):
        with torch.device("meta"):
            ours = QwenImage21DiT.from_checkpoint(shapes, config)
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
        assert ours.params == QwenImage21DiTParams()


def test_lora_layer_names_are_diffusers(checkpoint):
    """diffusers/peft LoRA keys name Linear layers by their module path: every Linear of diffusers' model is a
    Linear of ours, same path, same shape."""
    ref, ours, _ = checkpoint()
    theirs = {n: tuple(m.weight.shape) for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)}
    mine = {n: tuple(m.weight.shape) for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert theirs == mine and "modulation.1" in mine and "transformer_blocks.1.attn.to_out.0" in mine


@pytest.fixture(scope="module")
def qwen_image_1x(tmp_path_factory):
    ref = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 14, 14))
    folder = tmp_path_factory.mktemp("qwen_image_1x") / "transformer"
    randomize_(ref, seed=9).save_pretrained(folder)
    return folder


def test_1x_and_21_checkpoints_are_told_apart(checkpoint, qwen_image_1x, tmp_path):
    """With both classes as candidates, in either order, each checkpoint is recognised as its own; with only the
    other class (or the Qwen-Image pipeline's components) it is refused as not that model's, not as incomplete."""
    ref, _, folder_21 = checkpoint()
    for order in ([QwenImageDiT, QwenImage21DiT], [QwenImage21DiT, QwenImageDiT]):
        assert type(load_model([folder_21], order, torch.float32, "cpu")) is QwenImage21DiT
        assert type(load_model([qwen_image_1x], order, torch.float32, "cpu")) is QwenImageDiT
    for folder, candidates, name in ((folder_21, [QwenImageDiT], "QwenImageDiT"),
                                     (folder_21, list(QwenImagePipeline.components.values()), "QwenImageDiT"),
                                     (qwen_image_1x, [QwenImage21DiT], "QwenImage21DiT")):
        with pytest.raises(CheckpointError, match=rf"not a (plain )?{name} checkpoint"):
            load_model([folder], candidates, torch.float32, "cpu")
    # one shard of a 2.1 checkpoint that holds only block keys: an incomplete 2.1 checkpoint, not a 1.x one
    lone = tmp_path / "blocks.safetensors"
    save_file({k: v for k, v in ref.state_dict().items() if k.startswith("transformer_blocks.1.")}, str(lone))
    with pytest.raises(CheckpointError, match="not a QwenImageDiT checkpoint"):
        load_model([lone], [QwenImageDiT], torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="looks like a QwenImage21DiT checkpoint but lacks"):
        load_model([lone], [QwenImage21DiT], torch.float32, "cpu")
    assert not QwenImageDiT.owns_checkpoint_key("modulation.1.weight")
    assert not QwenImageDiT.owns_checkpoint_key("transformer_blocks.0.img_mlp.gate_layer.weight")
    assert not QwenImage21DiT.owns_checkpoint_key("txt_norm.weight")
    assert not QwenImage21DiT.owns_checkpoint_key("transformer_blocks.0.attn.to_q.bias")


def test_from_checkpoint_errors():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in QwenImage21DiT(QwenImage21DiTParams(**TINY)).state_dict().items()}
    with pytest.raises(ValueError, match="sums to"):
        QwenImage21DiT.from_checkpoint(shapes, dict(TINY, axes_dims_rope=(4, 14, 16)))
    with pytest.raises(ValueError, match="'txt_in.in_layer.weight' is missing"):
        QwenImage21DiT.from_checkpoint({k: v for k, v in shapes.items() if "in_layer" not in k}, None)
    with pytest.raises(ValueError, match="indices must be 0..N-1"):
        QwenImage21DiT.from_checkpoint({k: v for k, v in shapes.items() if ".0." not in k}, None)
