"""QwenImageTextEncoder on tiny random checkpoints.

The network is the project's own plain-torch Qwen2.5-VL decoder; transformers is the oracle:
`Qwen2_5_VLForConditionalGeneration(...).hidden_states[-1]` (what diffusers reads) and
`Qwen2_5_VLTextModel` with 3-D M-RoPE positions, on checkpoints written by transformers'
save_pretrained, in every layout, with and without padding, at several lengths, in float32
(<= 1e-5) and bfloat16. The loader path is the real one (parameters on meta, buffers on CPU,
then `load_state_dict(assign=True)`). What the network computes is also checked independently
of transformers against `reference_forward`, the Qwen2 decoder written out below in float64
from the checkpoint's tensors, and the prompt embeddings of the pipeline (template, tokenizer,
the 34-token prefix dropped) against the same forward on the hub-layout tiny repo."""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from pipelines.models.qwen2_5_text import QwenImageTextEncoder, QwenTextEncoderParams

transformers = pytest.importorskip("transformers")

VOCAB = 2048
HIDDEN, HEADS, HEAD_DIM, KV_HEADS, LAYERS, INTER = 32, 2, 16, 1, 2, 64
# grouped-query attention as in the real model (28 heads on 4): 2 query heads per kv head; transformers'
# Qwen2.5-VL takes head_dim = hidden / heads, so the width grows with the heads
GQA_HEADS, GQA_KV_HEADS, GQA_HIDDEN = 4, 2, 64


@contextmanager
def params_on_meta():
    """Like accelerate's init_empty_weights(include_buffers=False)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _tiny_reference(heads: int = HEADS, kv_heads: int = KV_HEADS, hidden: int = HIDDEN):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=INTER, num_hidden_layers=LAYERS,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
            rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=hidden, fullatt_block_indexes=[0]),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen25vl_tiny")
    model.save_pretrained(folder)
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    config = json.loads((folder / "config.json").read_text())
    return model, tensors, config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(reference model, {on-disk key: tensor}, config.json dict) from save_pretrained."""
    return _saved(_tiny_reference(), tmp_path_factory)


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """The same with 4 query heads sharing 2 key/value heads."""
    return _saved(_tiny_reference(GQA_HEADS, GQA_KV_HEADS, GQA_HIDDEN), tmp_path_factory)


def _load(tensors: dict[str, torch.Tensor], config: dict | None) -> QwenImageTextEncoder:
    """What the loader does: recognise, convert, build with params on meta, assign."""
    cls = QwenImageTextEncoder
    assert all(cls.owns_checkpoint_key(k) for k in tensors)
    state = {}
    for key, tensor in tensors.items():
        new = cls.convert_checkpoint_key(key)
        if new is not None:
            state[new] = tensor
    assert all(k in state for k in cls.CHECKPOINT_REQUIRED_KEYS)
    with params_on_meta():
        module = cls.from_checkpoint({k: tuple(v.shape) for k, v in state.items()}, config)
    assert all(p.is_meta for p in module.parameters())
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    assert not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    return module


def _to_new_layout(tensors):
    out = {}
    for k, v in tensors.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith("model.visual."):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


def _to_legacy_layout(tensors):
    out = {}
    for k, v in tensors.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        out[k] = v
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_forward(tensors: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int,
                      kv_heads: int, head_dim: int, rope_theta: float, eps: float) -> torch.Tensor:
    """The last hidden state (after the final RMSNorm) of the Qwen2 decoder behind Qwen2.5-VL, in
    float64, for text: causal attention over the unpadded tokens (right padding), q/k/v with
    biases, grouped keys/values, rotary embedding on positions 0..L-1 (M-RoPE with the three axes
    at the same position is plain RoPE), SwiGLU MLP. `tensors`: the legacy layout's names."""
    t = {k.removeprefix("model.language_model.").removeprefix("model."): v.double() for k, v in tensors.items()}
    batch, length = ids.shape
    h = t["embed_tokens.weight"][ids]
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # (B, heads, L, D): rotate the halves
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    n = 0
    while f"layers.{n}.input_layernorm.weight" in t:
        w = lambda name: t[f"layers.{n}.{name}"]  # noqa: E731, B023
        x = rms_norm(h, w("input_layernorm.weight"), eps)
        q, k, v = (x @ w(f"self_attn.{p}_proj.weight").T + w(f"self_attn.{p}_proj.bias") for p in "qkv")
        q = rope(q.view(batch, length, heads, head_dim).transpose(1, 2))
        k = rope(k.view(batch, length, kv_heads, head_dim).transpose(1, 2)).repeat_interleave(heads // kv_heads, 1)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        scores = (q @ k.transpose(-1, -2)) / head_dim ** 0.5
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0) @ v
        h = h + attn.transpose(1, 2).reshape(batch, length, heads * head_dim) @ w("self_attn.o_proj.weight").T
        x = rms_norm(h, w("post_attention_layernorm.weight"), eps)
        gate, up = x @ w("mlp.gate_proj.weight").T, x @ w("mlp.up_proj.weight").T
        h = h + (torch.nn.functional.silu(gate) * up) @ w("mlp.down_proj.weight").T
        n += 1
    assert n > 0
    return rms_norm(h, t["norm.weight"], eps)


def _reference_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1]


def test_save_pretrained_writes_legacy_layout_and_nested_text_config(checkpoint):
    # Facts of the installed transformers that the loader relies on (both layouts load anyway).
    _, tensors, config = checkpoint
    keys = set(tensors)
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert "lm_head.weight" in keys
    assert any(k.startswith("visual.") for k in keys)
    assert not any(k.startswith("model.language_model.") for k in keys)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert config["text_config"]["hidden_size"] == HIDDEN
        assert "hidden_size" not in config


def test_hidden_states_last_is_after_final_norm(checkpoint):
    model = checkpoint[0]
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    lm = model.model.language_model
    captured = {}
    handle = lm.layers[-1].register_forward_hook(
        lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        last = _reference_hidden(model, ids, torch.ones_like(ids))
    finally:
        handle.remove()
    torch.testing.assert_close(last, lm.norm(captured["h"]), atol=1e-6, rtol=0)
    assert not torch.allclose(last, captured["h"], atol=1e-3)


def _assert_parity(got: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """float32 parity: max |diff| <= 1e-5 x max |ref| (relative to the output scale); returns it."""
    if keep is not None:
        got, ref = got[keep], ref[keep]
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), f"max |diff| {diff:.3g}, outputs up to {ref.abs().max():.3g}"
    return diff


@pytest.mark.parametrize("layout", ["saved", "legacy", "new"])
def test_parity_with_transformers(checkpoint, layout):
    """Every checkpoint layout loads into the right places and gives transformers' hidden states:
    one prompt, a right-padded batch, a left-padded batch. Measured: max |diff| 0.0 (the same
    operations in the same order)."""
    model, tensors, config = checkpoint
    tensors = {"saved": tensors, "legacy": _to_legacy_layout(tensors), "new": _to_new_layout(tensors)}[layout]
    ours = _load(tensors, config)
    g = torch.Generator().manual_seed(2)

    ids = torch.randint(0, VOCAB, (1, 13), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = ours(ids, mask)
    assert got.shape == (1, 13, HIDDEN)
    _assert_parity(got, _reference_hidden(model, ids, mask))

    # batch 2, right padding (the tokenizer's default), different lengths
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    with torch.no_grad():
        got = ours(ids, mask)
    _assert_parity(got, _reference_hidden(model, ids, mask))
    # the masked-in tokens of the padded prompt equal the prompt encoded alone
    with torch.no_grad():
        alone = ours(ids[1:, :6], mask[1:, :6])
    torch.testing.assert_close(got[1:, :6], alone, atol=1e-5, rtol=1e-5)

    # left padding (a query with no real token before it: only the real tokens are compared)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        got = ours(ids, mask)
    _assert_parity(got, _reference_hidden(model, ids, mask), mask.bool())


def test_grouped_query_attention_equals_transformers(gqa_checkpoint):
    """4 query heads on 2 key/value heads: query heads 0-1 read kv head 0, 2-3 kv head 1. With one
    kv head (every other tiny encoder here) repeating it by tiling or by interleaving is the same,
    so only this catches the wrong order. Unpadded prompts (SDPA's own grouping) and padded
    batches (keys/values repeated per head, `_repeat_kv`), against transformers and the
    written-out decoder. Tiling instead of interleaving (kv heads 0, 1, 0, 1) passes every other
    encoder test and gives a max |diff| of 5.3 here, on outputs up to 4.7."""
    model, tensors, config = gqa_checkpoint
    ours = _load(tensors, config)
    assert ours.params.num_attention_heads == GQA_HEADS and ours.params.num_key_value_heads == GQA_KV_HEADS
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, VOCAB, (2, 13), generator=g)
    right, left = torch.ones_like(ids), torch.ones_like(ids)
    right[1, 7:] = 0
    left[0, :5] = 0
    for mask in (None, torch.ones_like(ids), right, left):
        with torch.no_grad():
            got = ours(ids, mask)
        keep = None if mask is None else mask.bool()
        _assert_parity(got, _reference_hidden(model, ids, mask), keep)
    expected = reference_forward(tensors, ids, right, GQA_HEADS, GQA_KV_HEADS, HEAD_DIM, 1e6, 1e-6)
    with torch.no_grad():
        got = ours(ids, right)
    torch.testing.assert_close(got[right.bool()].double(), expected[right.bool()], rtol=0, atol=2e-5)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 200])
def test_parity_at_several_lengths(checkpoint, length):
    """No mask, an all-ones mask (SDPA's causal flag, grouped keys not copied), and padding of
    every row but one (a boolean mask, keys copied per head), at lengths from 1 to 200."""
    model, tensors, config = checkpoint
    ours = _load(tensors, config)
    g = torch.Generator().manual_seed(10 + length)
    ids = torch.randint(0, VOCAB, (3, length), generator=g)
    padded = torch.ones_like(ids)
    for row, real in ((1, max(1, length // 2)), (2, max(1, length - 3))):
        padded[row, real:] = 0
    for mask in (None, torch.ones_like(ids), padded):
        with torch.no_grad():
            got = ours(ids, mask)
            ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        _assert_parity(got, ref)


def _text_model_reference(config: dict):
    """transformers' Qwen2_5_VLTextModel with the fixture's text weights (save_pretrained's config)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextModel

    return Qwen2_5_VLTextModel(Qwen2_5_VLConfig(**config).text_config).eval()


def test_multimodal_rope_sections_equal_transformers(checkpoint):
    """3-D positions that differ per axis (what pictures get): the rotary frequencies are cut
    into the mrope_section chunks [2, 3, 3] of head_dim/2 = 8, taking their positions from the
    temporal, height and width axes in that order, as transformers' rotary module lays them out.
    Measured: max |diff| 0.0; the sections taken in another order differ by ~1."""
    model, tensors, config = checkpoint
    ours = _load(tensors, config)
    reference = _text_model_reference(config)
    reference.load_state_dict({k.removeprefix("model.language_model."): v
                               for k, v in model.state_dict().items() if k.startswith("model.language_model.")})
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    base = torch.arange(24).expand(2, -1)
    positions = torch.stack([base // 6, 3 + base % 5, 7 + (base * 7) % 11])  # temporal, height, width
    with torch.no_grad():
        got = ours.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        other = ours.model(input_ids=ids, attention_mask=mask, position_ids=positions[[1, 2, 0]])
    _assert_parity(got, ref)
    assert (other - ref).abs().max() > 0.1  # the axes are told apart
    # (B, L) positions are the same on all three axes, which is what text gets
    with torch.no_grad():
        flat = ours.model(input_ids=ids, attention_mask=mask, position_ids=base)
        text = ours.model(input_ids=ids, attention_mask=mask)
    assert torch.equal(flat, text)


def test_sliding_window_layers_equal_transformers():
    """`use_sliding_window` (off in every Qwen2.5-VL release, honoured anyway): layers from
    max_window_layers on see the last `sliding_window` keys only, with and without padding."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLConfig(text_config=dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=3,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=4, max_window_layers=1, bos_token_id=None, eos_token_id=None,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])))
    torch.manual_seed(6)
    reference = Qwen2_5_VLTextModel(config.text_config).eval()
    assert reference.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    tensors = {"model." + k: v for k, v in reference.state_dict().items()}
    ours = _load(tensors, config.to_dict())
    assert [layer.sliding_window for layer in ours.model.layers] == [None, 4, 4]
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    padded = torch.ones_like(ids)
    padded[1, 8:] = 0
    for length, mask in ((3, None), (11, None), (11, padded)):
        with torch.no_grad():
            got = ours(ids[:, :length], None if mask is None else mask[:, :length])
            ref = reference(input_ids=ids[:, :length],
                            attention_mask=None if mask is None else mask[:, :length]).last_hidden_state
        _assert_parity(got, ref)
    full = QwenImageTextEncoder(dataclasses.replace(ours.params, use_sliding_window=False, sliding_window=None))
    full.load_state_dict(tensors)
    with torch.no_grad():  # the window matters
        assert (full.eval()(ids, None) - ours(ids, None)).abs().max() > 1e-3


def test_hidden_states_match_the_written_out_decoder(checkpoint):
    """Independent of transformers: ours against `reference_forward` (float64) on the same tensors.
    Measured: max |diff| 2.1e-6 on outputs up to 3.4 (float32 rounding); the other rotary convention
    (interleaved pairs instead of halves) gives 4.0. Bound: 2e-5."""
    _, tensors, config = checkpoint
    ours = _load(tensors, config)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as the tokenizer pads
    with torch.no_grad():
        got = ours(ids, mask)
    expected = reference_forward(tensors, ids, mask, HEADS, KV_HEADS, HEAD_DIM, 1e6, 1e-6)
    keep = mask.bool()
    assert expected[keep].abs().max() > 1
    torch.testing.assert_close(got[keep].double(), expected[keep], rtol=0, atol=2e-5)


def test_prompt_embeddings_match_the_written_out_decoder(diffusers_repo):
    """The pipeline's prompt embeddings (template, tokenizer, prefix dropped) on the tiny repo that
    diffusers/transformers wrote, against diffusers' template and prefix length, the repo's tokenizer
    and `reference_forward` over the repo's text-encoder tensors. Measured: max |diff| 2.6e-6 (outputs
    up to 3.6); the interleaved rotary convention gives 1.9. Bound: 2e-5."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from pipelines.qwen_image import ModelConfig, QwenImagePipeline

    root, reference = diffusers_repo
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=root / "text_encoder")],
        tokenizer_config=ModelConfig(path=root / "tokenizer"))
    tensors = {}
    for file in sorted((root / "text_encoder").glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    text = json.loads((root / "text_encoder" / "config.json").read_text())["text_config"]
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    for prompt in ("A red fox sitting in fresh snow, soft morning light", "一只可爱的猫 🐱, 4K", ""):
        ids = torch.tensor([tokenizer(reference.prompt_template_encode.format(prompt))["input_ids"]])
        expected = reference_forward(tensors, ids, torch.ones_like(ids), text["num_attention_heads"],
                                     text["num_key_value_heads"], text["head_dim"],
                                     text["rope_parameters"]["rope_theta"], text["rms_norm_eps"])
        expected = expected[:, reference.prompt_template_encode_start_idx:]
        embeds, mask = pipe.encode_prompt(prompt)
        assert mask is None and embeds.shape == expected.shape and expected.shape[1] > 0
        torch.testing.assert_close(embeds.double(), expected, rtol=0, atol=2e-5)


def test_rotary_buffers_are_real_under_meta_init(checkpoint):
    model, tensors, config = checkpoint
    ours = _load(tensors, config)
    ref_rot = model.model.language_model.rotary_emb
    rot = ours.model.rotary_emb
    assert rot.inv_freq.device.type == "cpu"
    torch.testing.assert_close(rot.inv_freq, ref_rot.inv_freq)
    assert list(rot.mrope_section) == [2, 3, 3]


def test_lm_head_and_visual_are_recognised_but_not_loaded(checkpoint):
    _, tensors, _ = checkpoint
    cls = QwenImageTextEncoder
    for key in ("lm_head.weight", "visual.blocks.0.attn.qkv.weight", "model.visual.merger.mlp.0.weight"):
        assert cls.owns_checkpoint_key(key)
        assert cls.convert_checkpoint_key(key) is None
    assert cls.convert_checkpoint_key("model.language_model.layers.1.mlp.up_proj.weight") == \
        "model.layers.1.mlp.up_proj.weight"
    assert cls.convert_checkpoint_key("model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    for key in ("transformer_blocks.0.attn.to_q.weight", "decoder.conv_in.weight", "model.foo.weight", "img_in.weight"):
        assert not cls.owns_checkpoint_key(key)
    ours = _load(tensors, checkpoint[2])
    assert not any(k.startswith(("lm_head", "visual", "model.visual")) for k in ours.state_dict())


def _converted_shapes(tensors):
    return {
        new: tuple(t.shape)
        for k, t in tensors.items()
        if (new := QwenImageTextEncoder.convert_checkpoint_key(k)) is not None
    }


def test_config_flat_nested_or_absent(checkpoint):
    _, tensors, config = checkpoint
    shapes = _converted_shapes(tensors)
    nested = QwenImageTextEncoder.params_from_checkpoint(shapes, config)
    flat_config = {k: v for k, v in config.items() if k != "text_config"}
    text = dict(config["text_config"])
    rope = text.pop("rope_parameters")
    flat_config.update(text, rope_theta=rope["rope_theta"],
                       rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    flat = QwenImageTextEncoder.params_from_checkpoint(shapes, flat_config)
    assert flat == nested
    assert nested.head_dim == HEAD_DIM and nested.num_attention_heads == HEADS
    assert nested.num_key_value_heads == KV_HEADS and nested.num_hidden_layers == LAYERS
    assert nested.intermediate_size == INTER and nested.vocab_size == VOCAB
    assert nested.mrope_section == [2, 3, 3] and nested.rope_theta == 1e6

    # without a config the real head_dim 128 is assumed: 32 features are not a multiple of it
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*head_dim 128"):
        QwenImageTextEncoder.params_from_checkpoint(shapes, None)
    # only head_dim given: the rest comes from the shapes, the mrope split is derived
    p = QwenImageTextEncoder.params_from_checkpoint(shapes, {"head_dim": 16})
    assert (p.num_attention_heads, p.num_key_value_heads, p.mrope_section) == (2, 1, [2, 3, 3])


def test_inconsistent_config_or_shapes_are_clear_errors(checkpoint):
    _, tensors, config = checkpoint
    shapes = _converted_shapes(tensors)
    bad = json.loads(json.dumps(config))
    bad["text_config"]["rope_parameters"]["mrope_section"] = [4, 4, 4]
    with pytest.raises(ValueError, match="mrope_section"):
        QwenImageTextEncoder.params_from_checkpoint(shapes, bad)
    missing = {k: v for k, v in shapes.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        QwenImageTextEncoder.params_from_checkpoint(missing, config)
    with pytest.raises(KeyError, match="model.language_model.rotary_emb.inv_freq"):
        QwenImageTextEncoder.convert_checkpoint_key("model.language_model.rotary_emb.inv_freq")


# The hub's Qwen/Qwen-Image text_encoder/config.json is flat (text parameters at the top level).
REAL_FLAT_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584},
}


def test_real_sizes_from_shapes_alone_and_from_the_real_config():
    real = QwenTextEncoderParams()
    with params_on_meta():
        shapes = {k: tuple(v.shape) for k, v in QwenImageTextEncoder(real).state_dict().items()}
    assert len(shapes) == 2 + 28 * 12
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 7_070_619_136
    for config in (None, REAL_FLAT_CONFIG, {"text_config": REAL_FLAT_CONFIG}):
        p = QwenImageTextEncoder.params_from_checkpoint(shapes, config)
        assert p == real, config
    with params_on_meta():
        module = QwenImageTextEncoder.from_checkpoint(shapes, REAL_FLAT_CONFIG)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes
    assert module.model.rotary_emb.inv_freq.shape == (64,) and module.model.rotary_emb.mrope_section == [16, 24, 24]
    # the names and shapes are those of transformers' own language model of that size
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    with torch.device("meta"):
        theirs = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])))
    assert {"model." + k: tuple(v.shape) for k, v in theirs.state_dict().items()} == shapes


def test_bfloat16_weights_run(checkpoint):
    """bfloat16 weights and compute against the float32 forward, over 2 x 40 tokens. bf16 rounding
    only, measured: mean |diff| 0.018, max 0.19 (outputs up to ~3.5: the random weights of std 0.3
    make the tiny model sensitive); transformers' own model cast to bf16: mean 0.018, max 0.20 (the
    plain-torch model computes the same operations in bf16: measured equal to it). One projection
    per layer rounded through float8 (down_proj) gives mean 0.035, bf16 by truncation instead of
    rounding mean 0.021 (1.15x transformers'). Bounds: mean <= 0.025 and <= 1.1 x transformers'
    bf16 mean, max <= 0.25."""
    import copy

    model, tensors, config = checkpoint
    ours = _load({k: v.to(torch.bfloat16) for k, v in tensors.items()}, config)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = ours(ids, mask)
    assert got.dtype == torch.bfloat16
    ref = _reference_hidden(model, ids, mask)
    theirs = _reference_hidden(copy.deepcopy(model).to(torch.bfloat16), ids, mask).float()
    error, their_error = (got.float() - ref).abs(), (theirs - ref).abs()
    assert error.mean() <= 0.025 and error.mean() <= 1.1 * their_error.mean() and error.max() <= 0.25, (
        f"mean {error.mean():.4f} (transformers' bf16: {their_error.mean():.4f}), max {error.max():.3f}")
