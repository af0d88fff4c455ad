"""Writing small random LoRAs in every file format `pipelines.core.lora` reads (tests, benchmarks,
the runner's tests).

    layers = random_lora(dit_state_dict_shapes, rank=4, seed=0)
    save_lora(path, layers, "kohya", scale=2.0)
    write_dit_lora(path, dit_state_dict_shapes)      # one call: a diffusers-format file

`layers` maps a layer name to (A, B), A (rank, in), B (out, rank). `scale` is the effective
`alpha / rank` the file must express: formats with an alpha (kohya, lightx2v) store
`alpha = scale * rank`; diffusers stores peft's config in the safetensors metadata
(`lora_adapter_metadata`, as `save_lora_weights` does); the others have no alpha and get
`scale * B`. With a power-of-two scale every format gives bit-identical effective weights.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("diffusers", "peft", "diffsynth", "comfyui", "kohya", "lightx2v")

# DiffSynth-Studio's default LoRA targets for Qwen-Image (its training scripts' lora_target_modules)
DIFFSYNTH_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "img_mod.1",
                     "txt_mlp.net.2", "txt_mod.1")

Layers = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def lora_targets(shapes: Mapping[str, Sequence[int]], targets: Sequence[str] | None = None) -> dict[str, tuple[int,
                                                                                                               int]]:
    """Layer name -> (out, in) for the 2-D `.weight` entries of a state-dict shape set whose name
    ends with one of `targets` (None: every linear layer)."""
    found = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        name = key[: -len(".weight")]
        if targets is None or any(name == t or name.endswith("." + t) for t in targets):
            found[name] = (int(shape[0]), int(shape[1]))
    if not found:
        raise ValueError(f"No linear layer of the given shapes matches the targets {targets}.")
    return found


def random_lora(shapes: Mapping[str, Sequence[int]], rank: int = 4, seed: int = 0,
                targets: Sequence[str] | None = None, magnitude: float = 0.5) -> dict[str, tuple[torch.Tensor,
                                                                                                 torch.Tensor]]:
    """Random non-zero (A, B) per target layer; `B @ A` changes a unit-scale layer's output by
    about `magnitude` of its own size (with the 1/sqrt(fan-in) weights of `checkpoints`)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (out_f, in_f) in lora_targets(shapes, targets).items():
        A = torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f)
        B = torch.randn(out_f, rank, generator=generator) * (magnitude / math.sqrt(rank))
        layers[name] = (A, B)
    return layers


def lora_state_dict(layers: Layers, fmt: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The keys and tensors of `fmt` (one of FORMATS). diffusers' scale lives in the metadata
    (see `save_lora`), so here it is folded into B like for the formats without an alpha."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown LoRA format {fmt!r}; one of {', '.join(FORMATS)}.")
    state = {}
    for name, (A, B) in layers.items():
        rank = A.shape[0]
        if fmt in ("kohya", "lightx2v"):
            base = "lora_unet_" + name.replace(".", "_") if fmt == "kohya" else name
            state[f"{base}.lora_down.weight"] = A.contiguous()
            state[f"{base}.lora_up.weight"] = B.contiguous()
            state[f"{base}.alpha"] = torch.tensor(float(scale * rank))
            continue
        prefix = {"diffusers": "transformer.", "peft": "base_model.model.", "comfyui": "diffusion_model.",
                  "diffsynth": ""}[fmt]
        adapter = ".default" if fmt == "diffsynth" else ""
        state[f"{prefix}{name}.lora_A{adapter}.weight"] = A.contiguous()
        state[f"{prefix}{name}.lora_B{adapter}.weight"] = (B * scale).contiguous()
    return state


def save_lora(path: str | Path, layers: Layers, fmt: str, scale: float = 1.0) -> Path:
    """Write `layers` as a `fmt` LoRA file with effective scale `scale`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if fmt == "diffusers" and scale != 1.0:
        rank = next(iter(layers.values()))[0].shape[0]
        if any(A.shape[0] != rank for A, _ in layers.values()):
            raise ValueError("save_lora: a diffusers file with a scale needs one rank for all layers.")
        state = lora_state_dict(layers, fmt, 1.0)
        metadata["lora_adapter_metadata"] = json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": scale * rank}, sort_keys=True)
    else:
        state = lora_state_dict(layers, fmt, scale)
    save_file(state, str(path), metadata=metadata)
    return path


def write_dit_lora(path: str | Path, shapes: Mapping[str, Sequence[int]], fmt: str = "diffusers", rank: int = 4,
                   seed: int = 0, targets: Sequence[str] | None = DIFFSYNTH_TARGETS, scale: float = 1.0,
                   magnitude: float = 0.5) -> Path:
    """A tiny random LoRA for a DiT whose state-dict shapes are `shapes`, written as `fmt`."""
    return save_lora(path, random_lora(shapes, rank, seed, targets, magnitude), fmt, scale)
