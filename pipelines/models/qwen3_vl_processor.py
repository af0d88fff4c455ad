"""Input side of Qwen-Image 2.1's prompt encoder (Qwen3-VL): prompts and pictures -> token ids,
mask, pixel patches and grids, as diffusers' `QwenImage21Pipeline` builds them with
transformers' `Qwen3VLProcessor`, without transformers and without torchvision.

`QwenImage21Processor.from_folder(repo / "processor")` reads the 2.1 `processor/` folder:
- the tokenizer (vocab.json + merges.txt + added_tokens.json, or tokenizer.json; with
  tokenizer_config.json when there is one): `qwen_tokenizer.QwenTokenizer`, the ids
  transformers' AutoTokenizer gives (Qwen3-VL's tokenizer is a Qwen2Tokenizer);
- the image processor (preprocessor_config.json, or the `image_processor` entry of
  processor_config.json): Qwen3-VL's is transformers' Qwen2-VL image processor with patch 16,
  merge 2, temporal patch 2, mean = std = 0.5 and {shortest_edge 65536, longest_edge
  16777216} pixels; `qwen_image_vision.QwenVLImageProcessor` computes it (smart resize to
  multiples of patch * merge = 32, bicubic, rescale, normalise, 2x2-block patch order);
- the chat template (chat_template.jinja, chat_template.json, or `chat_template` in
  processor_config.json / tokenizer_config.json), rendered with jinja2 for one system message
  to count the tokens of the system turn, which the encoder drops (`system_tokens`, 14 for
  the real template and system prompt).

`processor(prompts, pictures)` -> `ProcessorOutput` {input_ids, attention_mask (B, L) int64,
left-padded; with pictures also pixel_values (B * n * patches, 3*2*16*16) float32 and
image_grid_thw (B * n, 3) int64}: each prompt in the raw template (`prompt_text`: system
"Comprehend and analyze the provided prompt.", then the user turn, then the assistant's
opening; an empty prompt becomes " "), every picture's `<|image_pad|>` expanded to one token
per 2x2 patches, and one copy of the pictures per prompt (the same pictures condition every
prompt). The pipeline resizes the pictures before (each to `output_resolution`^2 area,
multiples of 32) and hands them over as they are; RGBA ones are composited over white here
(`composite_over_white`, exactly as diffusers does it) for the vision encoder only.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .qwen_image_vision import IMAGE_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN, ProcessorOutput, QwenVLImageProcessor
from .qwen_tokenizer import QwenTokenizer

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
PICTURE_PLACEHOLDER = VISION_START_TOKEN + IMAGE_TOKEN + VISION_END_TOKEN
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")
_FIX = ("download the `processor/` folder of Qwen/Qwen-Image-2.1 again, or write one with "
        "pipelines.demo.processor.build_qwen_image_21_processor_folder")


def prompt_text(prompt: str, pictures: int) -> str:
    """The raw template diffusers' QwenImage21Pipeline writes (not `apply_chat_template`):
    "<image1><|vision_start|><|image_pad|><|vision_end|>", then " <image2>..." per picture,
    before the prompt in the user turn."""
    prompt = prompt or " "  # Qwen has no bos token: an empty prompt would leave nothing to read
    images = " ".join(f"<image{i}>{PICTURE_PLACEHOLDER}" for i in range(1, pictures + 1))
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{images}{prompt}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def composite_over_white(picture: Any) -> Any:
    """An RGBA picture pasted through its alpha onto white RGB (PIL's paste arithmetic, as
    diffusers does it); any other mode is returned as it is (the image processor converts it)."""
    from PIL import Image

    if picture.mode != "RGBA":
        return picture
    white = Image.new("RGB", picture.size, (255, 255, 255))
    white.paste(picture, mask=picture.getchannel("A"))
    return white


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error}); {_FIX}") from error


def read_chat_template(folder: Path) -> tuple[str, Path]:
    """The processor's chat template and the file it came from, where transformers looks for it."""
    for name in CHAT_TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return path.read_text(encoding="utf-8"), path
        data = _read_json(path)
        template = data.get("chat_template") if isinstance(data, Mapping) else None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, Mapping)
                             and t.get("name") == "default"), None)
        if isinstance(template, str):
            return template, path
    raise FileNotFoundError(
        f"{folder}: no chat template ({', '.join(CHAT_TEMPLATE_FILES)}). Qwen-Image 2.1 drops the tokens of "
        f"the system turn, counted with the processor's chat template; {_FIX}")


def render_system_turn(template: str, system_prompt: str, special_tokens: Mapping[str, Any], where: Path) -> str:
    """The chat template rendered for one system message (no generation prompt), with jinja2
    set up as transformers sets it up."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=False, tools=None,
                                                documents=None, **{k: v for k, v in special_tokens.items() if v})
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"{where}: the chat template does not render a system message ({error}); {_FIX}") from error


class QwenImage21Processor:
    """Prompts + pictures -> the Qwen3-VL encoder's inputs (see the module docstring)."""

    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, image_processor: QwenVLImageProcessor, system_tokens: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.system_tokens = int(system_tokens)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token: it is not a Qwen3-VL tokenizer; {_FIX}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer has no pad token: prompts of different lengths cannot be batched; {_FIX}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "QwenImage21Processor":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder. Give the `processor/` folder of Qwen-Image 2.1; {_FIX}")
        if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
            raise FileNotFoundError(
                f"{folder}: no preprocessor_config.json (the image processor settings of Qwen3-VL); {_FIX}")
        image_processor = QwenVLImageProcessor.from_folder(folder)
        tokenizer = QwenTokenizer.from_folder(folder)  # its errors name the file and the fix
        template, where = read_chat_template(folder)
        rendered = render_system_turn(template, SYSTEM_PROMPT, tokenizer.special_tokens, where)
        system_tokens = len(tokenizer(rendered)["input_ids"])
        if not rendered.strip() or not prompt_text("x", 0).startswith(rendered):
            raise ValueError(f"{where}: the chat template renders the system turn as {rendered!r}, not the start of "
                             f"Qwen-Image 2.1's prompt template; {_FIX}")
        return cls(tokenizer, image_processor, system_tokens)

    @property
    def merge_size(self) -> int:
        return self.image_processor.merge_size

    def __call__(self, prompts: str | Sequence[str], pictures: Sequence[Any] | None = None) -> ProcessorOutput:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts: expected a string or a non-empty list of strings")
        held = [i for i, p in enumerate(prompts) if IMAGE_TOKEN in p]
        if held:
            raise ValueError(f"prompt {held[0]} holds {IMAGE_TOKEN}: pictures are given as pictures (the processor "
                             "writes their placeholders); remove the token from the prompt")
        pictures = list(pictures or [])
        texts = [prompt_text(p, len(pictures)) for p in prompts]
        pixel_values = grids = None
        if pictures:
            pixel_values, grids = self.image_processor([composite_over_white(p) for p in pictures])
            tokens = [int(g.prod()) // self.merge_size**2 for g in grids]
            texts = [self._expand(text, tokens) for text in texts]
        rows = self.tokenizer(texts)["input_ids"]
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        out = ProcessorOutput(input_ids=input_ids, attention_mask=attention_mask)
        if pictures:
            expected = len(prompts) * sum(tokens)
            found = int((input_ids == self.image_token_id).sum())
            if found != expected:
                raise ValueError(f"tokenizing gave {found} {IMAGE_TOKEN} tokens for {expected} picture tokens: the "
                                 f"tokenizer splits the picture token; {_FIX}")
            out["pixel_values"] = pixel_values.repeat(len(prompts), 1)
            out["image_grid_thw"] = grids.repeat(len(prompts), 1)
        return out

    def _expand(self, text: str, tokens: Sequence[int]) -> str:
        """Each picture's `<|image_pad|>`, in order, -> one per merged 2x2 patch block."""
        pieces = text.split(PICTURE_PLACEHOLDER)
        out = [pieces[0]]
        for count, piece in zip(tokens, pieces[1:]):
            out.append(VISION_START_TOKEN + IMAGE_TOKEN * count + VISION_END_TOKEN)
            out.append(piece)
        return "".join(out)
