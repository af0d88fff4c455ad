"""Qwen-Image 2.1 transformer (the 7B single-stream, block-causal DiT) in plain torch.

Parameter names and shapes are those of diffusers' `QwenImage21Transformer2DModel`: the published
`transformer/diffusion_pytorch_model*.safetensors` load without renaming, and diffusers/peft LoRA keys
(`transformer.<module path>.lora_A/B`) name our modules. Every projection is an `nn.Linear` called as a module (VRAM
management and hot LoRA wrap them from outside). RoPE tables are computed, never stored.

The joint sequence is `[prefix | target]`. The prefix is the prompt as the text encoder saw it (system turn dropped,
padding included), each vision slot (`<|image_pad|>` position) replaced by the 2x2 latent tokens it stands for: the
reference pictures' latent tokens, in order. The target (the picture generated) follows the whole prompt. Attention
is block-causal: causal over the sequence, bidirectional inside each picture (pictures are told apart by their token
counts, `references`, not by runs of slots); so the target sees everything and the prefix never sees the target.
With `causal_condition` (the published default) the prefix is modulated as at t = 0: its keys and values are the
same at every step.

    velocity = dit(latents, timestep, text, text_mask, height, width,
                   image_slots=None, references=(), reference_latents=None, cache=None)

    latents            (B, T, in_channels): the target's T = height * width latent tokens, row-major, unpatched
    timestep           (B,) sigma in [0, 1] (diffusers' `timestep / 1000`); a scalar is broadcast
    text, text_mask    (B, Lt, context_in_dim) the text encoder's hidden states (values at vision slots unread);
                       (B, Lt) bool, True = real token, or None. diffusers' pipeline pads on the right; padded
                       positions still count in the RoPE positions of what follows them
    height, width      the target's latent grid (picture size / 16)
    image_slots        (Lt,) or (B, Lt) bool (rows equal): True at the vision slots, 4 latent tokens each; None
    references         ((h, w), ...) the reference pictures' latent grids, in the order of their slots, and
    reference_latents  (B, sum h*w, in_channels) their latent tokens, row-major, one picture after the other
    returns            (B, T, out_channels): the velocity of the target's tokens, in the computation dtype

    velocities = dit.forward_prompts(latents, timestep, [PromptInput(text, text_mask, image_slots, cache), ...],
                                     height, width, references=(), reference_latents=None)

The same latents under several prompts (guidance's two): one velocity per prompt, each as `forward` gives it. While
their tokens add up to at most `pack_tokens`, the prompts go through the blocks packed into one sequence (each
projection multiplies all their tokens at once: larger products run faster on small images), attention per prompt.
The prefix is computed apart from the target (block by block, before it), as in every step with the cache; in the
last block only its keys and values (nothing reads the prefix's output of the last block).

The KV cache: `cache = KVCache()` per prompt and picture set (another one for the negative prompt under CFG), given
to every step of one generation. The first call computes the prefix and keeps each block's prefix keys/values (after
RoPE); later calls compute only the target's tokens and read them. The output is bitwise the same as without a
cache: the target is computed by the same code on the same shapes either way (the same prompts packed together:
that depends on token counts alone), and the prefix depends neither on the step nor on the target. It needs `causal_condition`; a call with other text, mask, pictures, dtype or device than
the one that filled it is refused. A new cache (or `cache.clear()`) per generation and after changing weights (LoRA).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .qwen_image_21_layout import (SLOT_TOKENS, Attend, KVCache, Layout, build_layout, packed, packed_attention,
                                   prefix_attention, target_attention, unpacked)
from .qwen_image_dit import check_rope_axes, default_rope_axes

__all__ = ["QwenImage21DiT", "QwenImage21DiTParams", "PromptInput", "KVCache", "SLOT_TOKENS"]


@dataclass
class QwenImage21DiTParams:
    """Hyper-parameters; the defaults are those of the published Qwen-Image 2.1 transformer."""

    patch_size: int = 1  # 2.1 reads its latents unpatched
    in_channels: int = 64
    out_channels: int = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096  # hidden size of the text encoder
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # frame, height, width slices of a head
    rope_theta: float = 10000.0
    eps: float = 1e-6
    causal_condition: bool = True  # text and reference tokens modulated as at t = 0 (what makes the cache valid)
    timestep_channels: int = 256

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "context_in_dim", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenImage21DiTParams.{name} must be a positive int, got {value!r}")
        check_rope_axes(self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def in_features(self) -> int:
        return self.patch_size ** 2 * self.in_channels


class RMSNorm(nn.Module):
    """Per-head RMS norm of queries and keys: `x / rms(x)` (rms in fp32), back to x's dtype, times `weight`."""

    def __init__(self, dim: int, eps: float, fill: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), fill))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(dtype) * self.weight.to(dtype)


class ZeroCenteredRMSNorm(RMSNorm):
    """RMS norm whose stored weight is `scale - 1` (zero-centred: built as zeros), all in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        dtype, x = x.dtype, x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.weight.float() + 1)).to(dtype)


class TextProjection(nn.Module):
    """`txt_in`: zero-centred RMS norm, `in_layer`, GELU (tanh), `out_layer`."""

    def __init__(self, context_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCenteredRMSNorm(context_dim, eps, fill=0.0)
        self.in_layer = nn.Linear(context_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimeEmbed(nn.Module):
    """`timestep_embedder.linear_1`, SiLU, `timestep_embedder.linear_2` (no biases) on the sinusoidal embedding."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = nn.Module()  # only a name in the checkpoint's keys
        self.timestep_embedder.linear_1 = nn.Linear(channels, dim, bias=False)
        self.timestep_embedder.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        mlp = self.timestep_embedder
        return mlp.linear_2(F.silu(mlp.linear_1(timestep_sinusoid(sigma, self.channels).to(dtype))))


def timestep_sinusoid(sigma: Tensor, channels: int) -> Tensor:
    """[cos, sin] of `1000 * sigma` times the frequencies, in fp32 (frequencies computed on the CPU, as the
    reference does)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(sigma.device)
    angles = (1000.0 * sigma.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class SwiGLU(nn.Module):
    """`out(silu(gate_layer(x)) * proj(x))`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.silu(self.gate_layer(x), inplace=True)  # in place: two (tokens, hidden) tensors at most, not 3
        return self.out(hidden.mul_(self.proj(x)))


class NormOut(nn.Module):
    """Final adaptive LayerNorm, scale only: `LayerNorm(x) * (1 + linear(SiLU(temb)))`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale = self.linear(F.silu(temb).to(x.dtype)).unsqueeze(1)
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2k], x[2k+1]) of x (B, L, H, D) by freqs (L, D/2) complex, in fp32."""
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs[:, None, :]
    return torch.view_as_real(rotated).flatten(3).to(x.dtype)


class Attention(nn.Module):
    """Projections, per-head RMS norm of q and k, RoPE; the attention pattern comes from the caller."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)

    def forward(self, x: Tensor, freqs: Tensor, attend: Attend) -> tuple[Tensor, Tensor, Tensor]:
        """-> (output (B, L, dim), keys after RoPE, values), the last two (B, L, H, D)."""
        q = apply_rope(self.norm_q(self._heads(self.to_q(x))), freqs)
        k, v = self.keys_values(x, freqs)
        return self.to_out[0](attend(q, k, v).flatten(2)), k, v

    def keys_values(self, x: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """The keys (after RoPE) and values of x alone, (B, L, H, D) each."""
        return apply_rope(self.norm_k(self._heads(self.to_k(x))), freqs), self._heads(self.to_v(x))

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.head_dim))


# the modulation of a run of tokens, each (rows, 1, dim): (1 + scale1, tanh(gate1), 1 + scale2, tanh(gate2))
Modulation = tuple[Tensor, Tensor, Tensor, Tensor]


class SingleStreamBlock(nn.Module):
    """One block: LayerNorm, scale, attention, gated residual; LayerNorm, scale, SwiGLU, gated residual. The
    scales and gates come from the model's one shared `modulation`."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Attention(dim, heads, head_dim, eps)
        self.img_mlp = SwiGLU(dim, mlp_ratio * dim)

    def forward(self, x: Tensor, mod: Modulation, freqs: Tensor, attend: Attend) -> tuple[Tensor, Tensor, Tensor]:
        """-> (x after the block, this block's keys and values of x)."""
        scale1, gate1, scale2, gate2 = mod
        attn, k, v = self.attn(self._norm(x) * scale1, freqs, attend)
        x = x + gate1 * attn
        x = x + gate2 * self.img_mlp(self._norm(x) * scale2)
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            x = x.clip(-65504, 65504)
        return x, k, v

    def keys_values(self, x: Tensor, mod: Modulation, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """Only this block's keys and values of x, as `forward` computes them; not x after the block."""
        return self.attn.keys_values(self._norm(x) * mod[0], freqs)

    def _norm(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps)


@dataclass
class PromptInput:
    """One prompt as `QwenImage21DiT.forward_prompts` reads it: `forward`'s arguments of these names."""

    text: Tensor
    text_mask: Tensor | None = None
    image_slots: Tensor | None = None
    cache: KVCache | None = None


@dataclass
class Stream:
    """One prompt during a forward: its layout, which of its keys are real (None: all), its cache and what the
    cache is checked against, and its prefix's keys and values block by block (the filled cache's, else appended
    as the blocks run)."""

    text: Tensor
    layout: Layout
    key_valid: Tensor | None
    cache: KVCache | None
    inputs: tuple
    prefix_kv: list

    def prefix_attention(self) -> Attend:
        valid = None if self.key_valid is None else self.key_valid[:, :self.layout.prefix_len]
        return partial(prefix_attention, segments=self.layout.segments, key_valid=valid)

    def target_attention(self, block: int) -> Attend:
        k, v = self.prefix_kv[block]
        return partial(target_attention, prefix_k=k, prefix_v=v, key_valid=self.key_valid)


# Exactly the key names of a 2.1 transformer checkpoint (no biases anywhere). The Qwen-Image 1.x DiT shares some
# of them (img_in.weight, attn.to_q.weight...); `modulation.1`, `txt_in.in_layer` and `img_mlp.gate_layer` are 2.1's.
_OWNED_KEY = re.compile(
    r"^(?:img_in|proj_out|norm_out\.linear|modulation\.1|txt_in\.(?:text_norm|in_layer|out_layer)"
    r"|time_text_embed\.timestep_embedder\.linear_[12]"
    r"|transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0|norm_[qk])|img_mlp\.(?:proj|gate_layer|out)))"
    r"\.weight$")
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")


class QwenImage21DiT(nn.Module):
    """The Qwen-Image 2.1 transformer; `forward` predicts the flow-matching velocity of the target's latents."""

    CHECKPOINT_REQUIRED_KEYS: tuple[str, ...] = (
        "img_in.weight", "txt_in.text_norm.weight", "txt_in.in_layer.weight", "modulation.1.weight",
        "time_text_embed.timestep_embedder.linear_1.weight", "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.img_mlp.gate_layer.weight",
        "norm_out.linear.weight", "proj_out.weight")

    # Set this when the weights are stored in another dtype than the one to compute in (e.g. FP8 storage under
    # VRAM management); None = compute in the weights' dtype.
    compute_dtype: torch.dtype | None = None
    # `forward_prompts` packs prompts while their tokens (prefix and target each) add up to at most this: small
    # matrix products run faster together; beyond, they are large enough, and packing would only add activations.
    pack_tokens: int = 4096

    def __init__(self, params: QwenImage21DiTParams | None = None):
        super().__init__()
        self.params = p = params or QwenImage21DiTParams()
        dim = p.inner_dim
        self.time_text_embed = TimeEmbed(p.timestep_channels, dim)
        self.txt_in = TextProjection(p.context_in_dim, dim, p.eps)
        self.img_in = nn.Linear(p.in_features, dim, bias=False)
        # one modulation for every block: [scale1, gate1, scale2, gate2]
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))
        self.transformer_blocks = nn.ModuleList([
            SingleStreamBlock(dim, p.num_attention_heads, p.attention_head_dim, p.mlp_ratio, p.eps)
            for _ in range(p.num_layers)
        ])
        self.norm_out = NormOut(dim, p.eps)
        self.proj_out = nn.Linear(dim, p.patch_size ** 2 * p.out_channels, bias=False)
        self._layouts: dict[tuple, Layout] = {}  # not a buffer on purpose

    @property
    def dtype(self) -> torch.dtype:
        """The computation dtype (inputs are cast to it, the output has it)."""
        return self.compute_dtype or self.img_in.weight.dtype

    def forward(self, latents: Tensor, timestep: Tensor | float, text: Tensor, text_mask: Tensor | None,
                height: int, width: int, image_slots: Tensor | None = None,
                references: tuple[tuple[int, int], ...] = (), reference_latents: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """The velocity (B, height * width, out_channels) of the target's tokens; arguments in the module
        docstring."""
        return self.forward_prompts(latents, timestep, [PromptInput(text, text_mask, image_slots, cache)], height,
                                    width, references, reference_latents)[0]

    def forward_prompts(self, latents: Tensor, timestep: Tensor | float, prompts: Sequence[PromptInput],
                        height: int, width: int, references: tuple[tuple[int, int], ...] = (),
                        reference_latents: Tensor | None = None) -> list[Tensor]:
        """The velocity of the same latents under each prompt (guidance's conditional and unconditional ones), as
        `forward` gives it for each. Prompts whose tokens add up to at most `pack_tokens` go through the blocks
        packed, one after the other in one sequence: each projection multiplies them all at once (faster than
        prompt by prompt), attention stays per prompt. Which prompts are packed depends on token counts alone, so a
        prompt's target is computed on the same shapes with and without its cache."""
        references = tuple((int(h), int(w)) for h, w in references)
        sigma = self._check_target(latents, timestep, height, width, prompts)
        streams = [self._stream(prompt, latents, height, width, references, reference_latents) for prompt in prompts]
        temb, target_mod, prefix_mod = self._modulations(sigma, latents.shape[0], self.dtype)
        packs: list[list[Stream]] = []
        for stream in streams:
            tokens = sum(s.layout.prefix_len + height * width for s in packs[-1] + [stream]) if packs else 0
            if packs and tokens <= self.pack_tokens:
                packs[-1].append(stream)
            else:
                packs.append([stream])
        target = self.img_in(latents.to(self.dtype))  # every prompt's target starts from the same latents
        return [v for pack in packs for v in self._forward_pack(pack, target, temb, (prefix_mod, target_mod),
                                                                 reference_latents)]

    def _forward_pack(self, streams: list[Stream], target: Tensor, temb: Tensor, mods: tuple[Modulation, Modulation],
                      reference_latents: Tensor | None) -> tuple[Tensor, ...]:
        """The blocks on the prompts of one pack: the prefixes not cached yet, then the targets."""
        (prefix_mod, target_mod), target_len = mods, target.shape[1]
        fresh = [s for s in streams if s.cache is None or not s.cache.filled]  # their prefixes computed here
        prefix = packed([self._embed_prefix(s.text, reference_latents, s.layout, target.dtype) for s in fresh])
        prefix_freqs = packed([s.layout.freqs[:s.layout.prefix_len] for s in fresh], dim=0)
        prefix_attend = partial(packed_attention, parts=[(s.layout.prefix_len, s.prefix_attention()) for s in fresh])
        target = packed([target] * len(streams))
        target_freqs = packed([s.layout.freqs[s.layout.prefix_len:] for s in streams], dim=0)
        last = len(self.transformer_blocks) - 1

        for index, block in enumerate(self.transformer_blocks):
            if prefix is not None:  # the prefix never sees the target: its block runs first
                if index == last:  # nothing reads the prefix after its last block: its keys and values only
                    prefix, (k, v) = None, block.keys_values(prefix, prefix_mod, prefix_freqs)
                else:
                    prefix, k, v = block(prefix, prefix_mod, prefix_freqs, prefix_attend)
                for s, k_s, v_s in zip(fresh, *unpacked((k, v), [s.layout.prefix_len for s in fresh])):
                    s.prefix_kv.append((k_s, v_s))
            parts = [(target_len, s.target_attention(index)) for s in streams]
            target, _, _ = block(target, target_mod, target_freqs, partial(packed_attention, parts=parts))
            for s in fresh:
                if s.cache is None:
                    s.prefix_kv[index] = None  # not kept: one block's keys and values at a time
        for s in fresh:
            if s.cache is not None:
                s.cache.layers, s.cache.inputs = s.prefix_kv, s.inputs  # once every block is done: never half-filled
        return unpacked((self.proj_out(self.norm_out(target, temb)),), [target_len] * len(streams))[0]

    def layout(self, slots: Tensor, references: tuple[tuple[int, int], ...], target: tuple[int, int],
               device: torch.device) -> Layout:
        """The joint sequence's layout (cached per slots, pictures, target grid and device)."""
        key = (slots.numel(), tuple(slots.nonzero()[:, 0].tolist()), references, target, torch.device(device))
        if key not in self._layouts:
            self._layouts = {} if len(self._layouts) >= 8 else self._layouts
            p = self.params
            self._layouts[key] = build_layout(slots, references, target, p.axes_dims_rope, p.rope_theta, device)
        return self._layouts[key]

    def _stream(self, prompt: PromptInput, latents: Tensor, height: int, width: int,
                references: tuple[tuple[int, int], ...], reference_latents: Tensor | None) -> Stream:
        """One prompt checked, its layout, and its prefix's keys and values: its filled cache's, else none yet."""
        if prompt.cache is not None and not self.params.causal_condition:
            raise ValueError("QwenImage21DiT: a KVCache needs causal_condition (text and picture tokens modulated "
                             "as at t = 0, so that their keys and values stay the same at every step); this "
                             "checkpoint's config.json sets causal_condition=false: pass cache=None")
        text_mask, slots = self._check_prompt(latents, prompt.text, prompt.text_mask, prompt.image_slots, references,
                                              reference_latents)
        layout = self.layout(slots, references, (height, width), latents.device)
        inputs = (prompt.text, text_mask, reference_latents, slots.nonzero().flatten().tolist(), references,
                  self.dtype, latents.device)
        prefix_kv: list = []
        if prompt.cache is not None and prompt.cache.filled:
            prompt.cache.check(inputs)
            prefix_kv = prompt.cache.layers
        return Stream(prompt.text, layout, layout.key_valid(text_mask, height * width), prompt.cache, inputs,
                      prefix_kv)

    def _modulations(self, sigma: Tensor, batch: int, dtype: torch.dtype) -> tuple[Tensor, Modulation, Modulation]:
        """(the target's timestep embedding (B, dim), the target's modulation, the prefix's modulation). With
        causal_condition the prefix's comes from one extra row at t = 0."""
        sigma = sigma.to(dtype)
        if self.params.causal_condition:
            sigma = torch.cat([sigma, sigma.new_zeros(1)])
        temb = self.time_text_embed(sigma, dtype)
        scale1, gate1, scale2, gate2 = self.modulation(temb).unsqueeze(1).chunk(4, dim=-1)
        rows = (1 + scale1, gate1.tanh(), 1 + scale2, gate2.tanh())
        target = tuple(r[:batch] for r in rows)
        prefix = tuple(r[batch:] for r in rows) if self.params.causal_condition else target
        return temb[:batch], target, prefix

    def _embed_prefix(self, text: Tensor, reference_latents: Tensor | None, layout: Layout,
                      dtype: torch.dtype) -> Tensor:
        """(B, P, dim): the projected text tokens with the pictures' latent tokens in their slots."""
        txt = self.txt_in(text[:, layout.text_index].to(dtype))
        prefix = txt.new_empty(txt.shape[0], layout.prefix_len, txt.shape[-1])
        prefix[:, layout.prefix_text] = txt
        if layout.prefix_image.numel():
            prefix[:, layout.prefix_image] = self.img_in(reference_latents.to(dtype))
        return prefix

    def _check_target(self, latents: Tensor, timestep: Tensor | float, height: int, width: int,
                      prompts: Sequence[PromptInput]) -> Tensor:
        """-> sigma (B,)."""
        p = self.params
        if latents.ndim != 3 or latents.shape[-1] != p.in_features:
            raise ValueError(f"QwenImage21DiT: latents must be (batch, tokens, {p.in_features}), got "
                             f"{tuple(latents.shape)}")
        batch = latents.shape[0]
        if height <= 0 or width <= 0 or latents.shape[1] != height * width:
            raise ValueError(f"QwenImage21DiT: latents hold {latents.shape[1]} tokens but the target grid "
                             f"{height}x{width} makes {height * width}; height/width are the picture size / 16")
        caches = [id(prompt.cache) for prompt in prompts if prompt.cache is not None]
        if not prompts or len(set(caches)) != len(caches):
            raise ValueError("QwenImage21DiT.forward_prompts: give at least one PromptInput, each with a KVCache of "
                             "its own (or cache=None)")
        sigma = torch.as_tensor(timestep, device=latents.device)
        if sigma.ndim == 0 or sigma.shape == (1,):
            sigma = sigma.reshape(1).expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"QwenImage21DiT: timestep must be (batch={batch},) sigmas, got {tuple(sigma.shape)}")
        return sigma

    def _check_prompt(self, latents: Tensor, text: Tensor, text_mask: Tensor | None, image_slots: Tensor | None,
                      references: tuple[tuple[int, int], ...],
                      reference_latents: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """-> (the mask as bool or None, the slots as one (Lt,) bool row on the CPU)."""
        batch, context_dim = latents.shape[0], self.params.context_in_dim
        if text.ndim != 3 or text.shape[0] != batch or text.shape[1] == 0 or text.shape[-1] != context_dim:
            raise ValueError(f"QwenImage21DiT: text must be (batch={batch}, tokens >= 1, {context_dim}), "
                             f"got {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"QwenImage21DiT: text_mask must be (batch, text tokens) = {tuple(text.shape[:2])}, "
                             f"got {tuple(text_mask.shape)}")
        text_mask = None if text_mask is None else text_mask.to(device=latents.device, dtype=torch.bool)
        return text_mask, self._check_pictures(text, image_slots, references, reference_latents)

    def _check_pictures(self, text: Tensor, image_slots: Tensor | None, references: tuple[tuple[int, int], ...],
                        reference_latents: Tensor | None) -> Tensor:
        batch, text_len = text.shape[:2]
        slots = torch.zeros(text_len, dtype=torch.bool) if image_slots is None else image_slots.bool().cpu()
        if slots.ndim == 2 and slots.shape[0] == batch:
            if not bool((slots == slots[:1]).all()):
                raise ValueError("QwenImage21DiT: image_slots differ between the samples of the batch; the "
                                 "pictures must sit at the same positions of every prompt (pad on the right)")
            slots = slots[0]
        if tuple(slots.shape) != (text_len,):
            raise ValueError(f"QwenImage21DiT: image_slots must be (text tokens,) = ({text_len},) or (batch, text "
                             f"tokens), got {tuple(image_slots.shape)}")
        if any(h <= 0 or w <= 0 for h, w in references):
            raise ValueError(f"QwenImage21DiT: references must be positive (height, width) grids, got {references}")
        tokens = sum(h * w for h, w in references)
        if SLOT_TOKENS * int(slots.sum()) != tokens:
            raise ValueError(f"QwenImage21DiT: the prompt has {int(slots.sum())} vision slots (= "
                             f"{SLOT_TOKENS * int(slots.sum())} latent tokens, 2x2 each) but references "
                             f"{list(references)} make {tokens}; each picture's grid is its size / 16")
        expected = (batch, tokens, self.params.in_features)
        got = None if reference_latents is None else tuple(reference_latents.shape)
        if (tokens or got is not None) and got != expected:
            raise ValueError(f"QwenImage21DiT: reference_latents must be {expected} (the pictures' latent tokens, "
                             f"one picture after the other), got {got}")
        return slots

    @staticmethod  # the checkpoint contract (pipelines.core.checkpoint.CheckpointModel) from here on
    def owns_checkpoint_key(key: str) -> bool:
        return _OWNED_KEY.match(key) is not None

    @staticmethod
    def convert_checkpoint_key(key: str) -> str | None:
        return key  # the diffusers layout is ours

    @classmethod
    def from_checkpoint(cls, shapes: Mapping[str, tuple[int, ...]], config: dict[str, Any] | None) -> "QwenImage21DiT":
        # every key and shape is then checked by the loader, which names the file
        return cls(params_from_checkpoint(shapes, config))


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes or len(shapes[key]) != ndim:
        raise ValueError(f"Qwen-Image 2.1 DiT checkpoint: required key {key!r} is missing or not {ndim}-D "
                         f"({shapes.get(key)})")
    return tuple(shapes[key])


def _divide(total: int, part: int, what: str) -> int:
    if part <= 0 or total % part:
        raise ValueError(f"Qwen-Image 2.1 DiT checkpoint: {what}: {total} is not a multiple of {part}")
    return total // part


def params_from_checkpoint(shapes: Mapping[str, tuple[int, ...]],
                           config: dict[str, Any] | None) -> QwenImage21DiTParams:
    """The hyper-parameters from the tensor shapes; values in `config` (diffusers config.json) win where given."""
    config = {k: v for k, v in (config or {}).items() if v is not None}
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ValueError(f"Qwen-Image 2.1 DiT checkpoint: 'transformer_blocks.N.*' indices must be 0..N-1, got "
                         f"{sorted(blocks)[:10]}")
    inner, in_features = _shape(shapes, "img_in.weight", 2)
    txt_inner, context_dim = _shape(shapes, "txt_in.in_layer.weight", 2)
    if txt_inner != inner:
        raise ValueError(f"Qwen-Image 2.1 DiT checkpoint: 'txt_in.in_layer.weight' has {txt_inner} rows but "
                         f"'img_in.weight' has {inner}; both must be the inner dim")
    head_dim = int(config.get("attention_head_dim", _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", 1)[0]))
    mlp_rows = _shape(shapes, "transformer_blocks.0.img_mlp.proj.weight", 2)[0]
    patch = int(config.get("patch_size", 1))
    in_channels = int(config.get("in_channels", _divide(in_features, patch * patch, "'img_in.weight' columns")))
    out_rows = _shape(shapes, "proj_out.weight", 2)[0]
    axes = config.get("axes_dims_rope") or default_rope_axes(head_dim)
    return QwenImage21DiTParams(
        patch_size=patch,
        in_channels=in_channels,
        out_channels=int(config.get("out_channels", _divide(out_rows, patch * patch, "'proj_out.weight' rows"))),
        num_layers=int(config.get("num_layers", len(blocks))),
        attention_head_dim=head_dim,
        num_attention_heads=int(config.get("num_attention_heads", _divide(inner, head_dim, "inner dim / head dim"))),
        context_in_dim=int(config.get("context_in_dim", context_dim)),
        mlp_ratio=int(config.get("mlp_ratio", _divide(mlp_rows, inner, "'img_mlp.proj.weight' rows / inner dim"))),
        axes_dims_rope=tuple(int(a) for a in axes),
        eps=float(config.get("eps", 1e-6)),
        causal_condition=bool(config.get("causal_condition", True)),
    )
