"""An offline stand-in for a Qwen-Image-Edit repo's `processor/` folder.

`build_processor_folder(out_dir)` writes the real-vocabulary Qwen2.5-VL tokenizer
(`pipelines.demo.tokenizer.build_qwen_tokenizer`) plus `preprocessor_config.json` with the
values of Qwen2.5-VL-7B's image processor, under the field names transformers'
`Qwen2VLImageProcessor` reads (min_pixels/max_pixels override `size`, which transformers 5.x
writes as {shortest_edge, longest_edge}).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tokenizer import build_qwen_tokenizer

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
