"""Match a LoRA to a module's linear layers and check it whole before anything is applied:
every key names a layer (`strict=False` skips the others with a warning), A and B pair up,
shapes fit, values are finite. Scaling of each layer: `alpha / rank` when the file holds an
`.alpha` tensor for it (kohya, lightx2v, ComfyUI); else peft's `lora_alpha / r` (or
`/ sqrt(r)` with rsLoRA) when the file carries its adapter config; else 1."""
from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .formats import (
    ALPHA_KEY,
    KNOWN_PREFIXES,
    KOHYA_PREFIX,
    UNSUPPORTED_HINTS,
    WEIGHT_KEY,
    LoraError,
    LoraFile,
    LoraSource,
    lora_format,
    read_lora,
)

logger = logging.getLogger(__name__)

Groups = dict[str, dict[str, str]]  # path in the file -> {"A" | "B" | "alpha": key}


@dataclass
class LoraLayer:
    """One layer's low-rank update: `scale * B @ A`, A (rank, in), B (out, rank)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class PreparedLora:
    """A LoRA matched and checked against one module; applying it cannot fail on its content."""

    layers: list[LoraLayer]  # in the module's order
    format: str
    origin: str
    skipped_keys: list[str] = field(default_factory=list)
    files: tuple[str, ...] = ()  # the LoRA's files (real paths); empty for a state dict


def linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can target: nn.Linear (and wrappers that subclass it or look like it)."""
    found = {}
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) or (
                hasattr(child, "in_features") and hasattr(child, "out_features")
                and isinstance(getattr(child, "weight", None), torch.Tensor) and child.weight.ndim == 2):
            found[name] = child
    return found


def prepare_lora(module: nn.Module, lora: LoraSource, strict: bool = True) -> PreparedLora:
    """Read, normalise and check a LoRA against `module` without changing anything."""
    source = read_lora(lora)
    targets = linear_layers(module)
    fmt = lora_format(source.shapes)
    groups, not_lora = _group_keys(source)
    flat = _flat_names(targets)
    matched, unmatched = _match_layers(source, groups, targets, flat)
    skipped = not_lora + unmatched
    if not matched:
        raise LoraError(_unmatched_message(source.origin, fmt, type(module).__name__, skipped, targets, flat,
                                           none_matched=True))
    if skipped:
        message = _unmatched_message(source.origin, fmt, type(module).__name__, skipped, targets, flat)
        if strict:
            raise LoraError(message + " Pass strict=False to load the matching layers anyway.")
        logger.warning("%s Skipping them (strict=False).", message)
    order = {name: i for i, name in enumerate(targets)}
    layer_paths = sorted(matched.items(), key=lambda item: order[item[0]])  # the first misfit is named
    for layer, path in layer_paths:
        _check_shapes(source, groups[path], layer, targets[layer], type(module).__name__)
    return PreparedLora(_read_layers(source, groups, layer_paths), fmt, source.origin, skipped_keys=skipped,
                        files=source.files)


def _group_keys(source: LoraFile) -> tuple[Groups, list[str]]:
    """key -> (path, role); the keys that are no LoRA weight or alpha at all."""
    groups: Groups = {}
    not_lora: list[str] = []
    for key in source.shapes:
        if (m := WEIGHT_KEY.match(key)) is not None:
            path, role = m["path"], "A" if m["a"] else "B"
        elif (m := ALPHA_KEY.match(key)) is not None:
            path, role = m["path"], "alpha"
        else:
            not_lora.append(key)
            continue
        if role in groups.setdefault(path, {}):
            raise LoraError(f"{source.origin}: keys {groups[path][role]!r} and {key!r} give the same layer's "
                            f"{role} twice (two adapters in one file?). Keep one adapter per file.")
        groups[path][role] = key
    return groups, not_lora


def _match_layers(source: LoraFile, groups: Groups, targets: Mapping[str, nn.Module],
                  flat: Mapping[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """layer name -> path of the file's keys; the keys of paths that match no layer."""
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for path, roles in groups.items():
        layer = _resolve(path, targets, flat)
        if layer is None:
            unmatched.extend(roles.values())
        elif layer in matched:
            raise LoraError(f"{source.origin}: {path!r} and {matched[layer]!r} both target layer {layer!r}. "
                            "The file mixes two LoRAs; split it.")
        else:
            matched[layer] = path
    incomplete = [(p, r) for p, r in groups.items() if ("A" in r) != ("B" in r) and p in matched.values()]
    if incomplete:
        path, roles = incomplete[0]
        raise LoraError(f"{source.origin}: layer {path!r} has {'lora_A' if 'A' in roles else 'lora_B'} but no "
                        f"{'lora_B' if 'A' in roles else 'lora_A'} ({len(incomplete)} layer(s) like this). "
                        "The file is incomplete or not a LoRA.")
    alpha_only = {p for p in matched.values() if "A" not in groups[p]}
    unmatched.extend(groups[p]["alpha"] for p in alpha_only)
    return {layer: p for layer, p in matched.items() if p not in alpha_only}, unmatched


def _check_shapes(source: LoraFile, roles: dict[str, str], layer: str, target: nn.Module, model_name: str) -> None:
    a_shape, b_shape = source.shapes[roles["A"]], source.shapes[roles["B"]]
    out_f, in_f = target.weight.shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
        raise LoraError(
            f"{source.origin}: the LoRA does not fit {model_name} at layer {layer!r}: lora_A "
            f"{list(a_shape)} and lora_B {list(b_shape)}, but the layer is Linear({in_f} -> {out_f}) "
            f"(expects A [rank, {in_f}], B [{out_f}, rank]). The LoRA was made for another model or "
            "model size; nothing was applied.")
    if "alpha" in roles and math.prod(source.shapes[roles["alpha"]]) != 1:
        raise LoraError(f"{source.origin}: {roles['alpha']!r} should be a single number, has shape "
                        f"{list(source.shapes[roles['alpha']])}.")


def _read_layers(source: LoraFile, groups: Groups, layer_paths: list[tuple[str, str]]) -> list[LoraLayer]:
    """Read the tensors, refuse non-finite values, work out the scales."""
    tensors = source.read([k for _, path in layer_paths for k in groups[path].values()])
    layers = []
    for layer, path in layer_paths:
        roles = groups[path]
        A, B = tensors[roles["A"]], tensors[roles["B"]]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise LoraError(f"{source.origin}: {roles['A']!r} / {roles['B']!r} are not floating-point tensors.")
        for key in roles.values():
            if not bool(torch.isfinite(tensors[key]).all()):
                raise LoraError(f"{source.origin}: {key!r} (layer {layer!r}) holds NaN or infinite values; the "
                                "file is corrupt or the training diverged. Nothing was applied: use another file.")
        rank = A.shape[0]
        if "alpha" in roles:
            scale = float(tensors[roles["alpha"]].float().item()) / rank
        else:
            scale = _config_scale(source.adapter_config, layer, rank, source.origin)
        if not math.isfinite(scale):
            raise LoraError(f"{source.origin}: layer {layer!r} gets a non-finite scale ({scale}) from the file's "
                            "alpha / adapter config. Nothing was applied: fix the file's alpha.")
        layers.append(LoraLayer(layer, A, B, scale))
    return layers


def _flat_names(targets: Mapping[str, nn.Module]) -> dict[str, str | None]:
    """kohya's flattened names (`.` -> `_`); None marks a flattening two layers share."""
    flat: dict[str, str | None] = {}
    for name in targets:
        key = name.replace(".", "_")
        flat[key] = None if key in flat else name
    return flat


def _resolve(path: str, targets: Mapping[str, nn.Module], flat: Mapping[str, str | None]) -> str | None:
    candidate = path
    while True:
        if candidate in targets:
            return candidate
        if candidate.startswith(KOHYA_PREFIX):
            return flat.get(candidate[len(KOHYA_PREFIX):])
        prefix = next((p for p in KNOWN_PREFIXES if candidate.startswith(p)), None)
        if prefix is None:
            return None
        candidate = candidate[len(prefix):]


def _strip(path: str) -> str:
    """The layer-name part of a path, for suggestions."""
    changed = True
    while changed:
        changed = False
        for prefix in KNOWN_PREFIXES + (KOHYA_PREFIX,):
            if path.startswith(prefix):
                path, changed = path[len(prefix):], True
    return path


def _key_path(key: str) -> str:
    for pattern in (WEIGHT_KEY, ALPHA_KEY):
        if (m := pattern.match(key)) is not None:
            return m["path"]
    return key


def _unmatched_message(origin: str, fmt: str, model_name: str, keys: list[str], targets: Mapping[str, nn.Module],
                       flat: Mapping[str, str | None], none_matched: bool = False) -> str:
    shown = keys[:5]
    lines = []
    for key in shown:
        hint = next((v for k, v in UNSUPPORTED_HINTS.items() if k in key), None)
        if hint is not None:
            lines.append(f"{key!r} ({hint} is not supported)")
            continue
        path = _strip(_key_path(key))
        names = list(flat) if _key_path(key).startswith(KOHYA_PREFIX) else list(targets)
        near = difflib.get_close_matches(path, names, n=2, cutoff=0.5)
        if _key_path(key).startswith(KOHYA_PREFIX):
            near = [flat[n] or n for n in near]
        lines.append(f"{key!r} (nearest layers: {', '.join(near) if near else 'none close'})")
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    head = (f"{origin}: no key of this {fmt} LoRA matches a linear layer of {model_name}; is it for another model?"
            if none_matched else
            f"{origin}: {len(keys)} key(s) of this {fmt} LoRA match no linear layer of {model_name}:")
    example = next(iter(targets), "")
    return (f"{head} {'; '.join(lines)}{more}. Layer names look like {example!r} (optionally prefixed "
            f"{', '.join(repr(p) for p in KNOWN_PREFIXES)}, or kohya's {KOHYA_PREFIX!r} with '_' for '.').")


def _config_scale(config: Mapping[str, Any] | None, layer: str, rank: int, origin: str) -> float:
    """peft's scaling from its LoraConfig fields: lora_alpha / r (rsLoRA: / sqrt(r))."""
    if not config or config.get("lora_alpha") is None:
        return 1.0
    if config.get("use_dora"):
        raise LoraError(f"{origin}: a DoRA adapter (use_dora=True); DoRA is not supported.")
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


