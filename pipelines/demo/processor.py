"""Offline stand-ins for the `processor/` folders of a Qwen-Image-Edit repo and of Qwen-Image 2.1.

`build_processor_folder(out_dir)` writes the real-vocabulary Qwen2.5-VL tokenizer
(`pipelines.demo.tokenizer.build_qwen_tokenizer`) plus `preprocessor_config.json` with the
values of Qwen2.5-VL-7B's image processor, under the field names transformers'
`Qwen2VLImageProcessor` reads (min_pixels/max_pixels override `size`, which transformers 5.x
writes as {shortest_edge, longest_edge}).

`build_qwen_image_21_processor_folder(out_dir)` writes the Qwen3-VL tokenizer
(`build_qwen3_tokenizer`), `preprocessor_config.json` with Qwen3-VL's image processor values
and `chat_template.jinja`: the branches of Qwen3-VL's chat template that a conversation without
tools reaches (what Qwen-Image 2.1 renders to count its system turn's tokens).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tokenizer import build_qwen3_tokenizer, build_qwen_tokenizer

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json (the processor of Qwen-Image-Edit).
QWEN25_VL_PREPROCESSOR_CONFIG: dict = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


# Qwen3-VL's preprocessor_config.json (the processor of Qwen-Image 2.1): transformers builds its
# Qwen2-VL image processor from it (the PIL one without torchvision).
QWEN3_VL_PREPROCESSOR_CONFIG: dict = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

# Qwen3-VL's chat template without its tool branches: a system turn, then user turns (text and
# picture placeholders) and assistant turns, each "<|im_start|>{role}\n...<|im_end|>\n".
QWEN3_VL_CHAT_TEMPLATE = """{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.content is string %}
        {{- message.content }}
    {%- else %}
        {%- for content in message.content %}
            {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif content.type == 'video' or 'video' in content %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in content %}
                {{- content.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def build_processor_folder(out_dir: str | os.PathLike, **overrides) -> Path:
    """Write the tokenizer files and preprocessor_config.json into `out_dir` (created if
    needed) and return it. `overrides` replace preprocessor fields (e.g. max_pixels)."""
    out = Path(out_dir)
    build_qwen_tokenizer(out)
    config = {**QWEN25_VL_PREPROCESSOR_CONFIG, **overrides}
    tmp = out / "preprocessor_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "preprocessor_config.json")
    return out


def build_qwen_image_21_processor_folder(out_dir: str | os.PathLike, **overrides) -> Path:
    """Write Qwen-Image 2.1's `processor/` folder (Qwen3-VL tokenizer, preprocessor_config.json,
    chat_template.jinja) into `out_dir` (created if needed) and return it. `overrides` replace
    preprocessor fields (e.g. size={"shortest_edge": 1024, "longest_edge": 65536})."""
    out = Path(out_dir)
    build_qwen3_tokenizer(out)
    files = {"preprocessor_config.json": json.dumps({**QWEN3_VL_PREPROCESSOR_CONFIG, **overrides}, indent=2) + "\n",
             "chat_template.jinja": QWEN3_VL_CHAT_TEMPLATE}
    for name, text in files.items():
        tmp = out / f"{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out
