"""Start-up cost: what a fresh process imports on its way to the first image.

Text-to-image never imports transformers (the text encoder is plain torch, the tokenizer is read
with the `tokenizers` library); an edit imports transformers for the vision tower only: exactly
the modules that importing `transformers.models.qwen2_5_vl.modeling_qwen2_5_vl` on its own pulls
in (the modeling module brings transformers' modeling base, generation and auto machinery with
it), none of transformers' Qwen tokenizers or processors. Each case runs in a fresh interpreter; the
seconds of each stage are printed (measured, not asserted: the machine is shared).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PRELUDE = """
import json, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(2)
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipelines.qwen_image import ModelConfig, QwenImagePipeline

folder = Path({folder!r})
imported = time.perf_counter()


def transformers_modules():
    return sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers."))
"""

TEXT_TO_IMAGE = PRELUDE + """
pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.float32, device="cpu",
    model_configs=[ModelConfig(path=folder / name) for name in ("transformer", "text_encoder", "vae")],
    tokenizer_config=ModelConfig(path=folder / "tokenizer"))
loaded = time.perf_counter()
image = pipe("a red fox sitting in fresh snow", seed=0, height=128, width=128, num_inference_steps=2,
             progress_bar=False)
done = time.perf_counter()
print(json.dumps({{"size": list(image.size), "transformers": transformers_modules(),
                  "torch._dynamo": "torch._dynamo" in sys.modules, "tokenizer": type(pipe.tokenizer).__name__,
                  "import_s": imported - start, "load_s": loaded - imported, "first_image_s": done - loaded}}))
"""

EDIT = PRELUDE + """
import numpy as np
from PIL import Image

pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.float32, device="cpu",
    model_configs=[ModelConfig(path=folder / name) for name in ("transformer", "text_encoder", "vae")],
    processor_config=ModelConfig(path=folder / "processor"))
loaded = time.perf_counter()
picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
image = pipe("make the sky purple", seed=0, edit_image=[picture], edit_image_auto_resize=False, height=64,
             width=64, num_inference_steps=1, progress_bar=False)
done = time.perf_counter()
print(json.dumps({{"size": list(image.size), "transformers": transformers_modules(),
                  "tokenizer": type(pipe.tokenizer).__name__,
                  "import_s": imported - start, "load_s": loaded - imported, "first_image_s": done - loaded}}))
"""

VISION_MODULE_ALONE = """
import json, sys
import torch
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl
print(json.dumps(sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers."))))
"""

TEXT_ENCODER_BUILD = """
import json, sys
import torch
sys.path.insert(0, {repo!r})
from pipelines.core.loader import parameters_on_meta
from pipelines.models.qwen2_5_text import QwenImageTextEncoder
from pipelines.models.qwen_tokenizer import QwenTokenizer

with parameters_on_meta():
    encoder = QwenImageTextEncoder()  # the real 7B sizes, parameters on meta as the loader builds it
tokenizer = QwenTokenizer.from_folder({tokenizer!r})
print(json.dumps({{"parameters": sum(p.numel() for p in encoder.parameters()),
                  "ids": tokenizer("a cat")["input_ids"],
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] == "transformers"
                                  or m.startswith("torch._dynamo"))}}))
"""


def run_fresh(script: str) -> dict | list:
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(capsys, name: str, result: dict) -> None:
    total = result["import_s"] + result["load_s"] + result["first_image_s"]
    with capsys.disabled():
        print(f"\n[startup] {name}: import {result['import_s']:.2f} s, load {result['load_s']:.2f} s, first image "
              f"{result['first_image_s']:.2f} s (total {total:.2f} s), transformers modules: "
              f"{len(result['transformers'])}")


def test_text_to_image_never_imports_transformers(tiny_repo, capsys):
    result = run_fresh(TEXT_TO_IMAGE.format(repo=str(REPO), folder=str(tiny_repo)))
    assert result["size"] == [128, 128] and result["tokenizer"] == "QwenTokenizer"
    assert result["transformers"] == [], result["transformers"][:10]
    report(capsys, f"text-to-image (torch._dynamo imported: {result['torch._dynamo']})", result)


def test_the_text_encoder_and_tokenizer_import_nothing_heavy(tiny_repo):
    """Building the real-size language model on meta and reading the tokenizer: no transformers,
    and no torch._dynamo (a random init on the meta device imports it: seconds of a cold start)."""
    result = run_fresh(TEXT_ENCODER_BUILD.format(repo=str(REPO), tokenizer=str(tiny_repo / "tokenizer")))
    assert result["parameters"] == 7_070_619_136 and result["ids"] == [64, 8251]
    assert result["heavy"] == []


@pytest.mark.slow
def test_an_edit_imports_only_the_vision_modeling_of_transformers(tiny_edit_repo, capsys):
    result = run_fresh(EDIT.format(repo=str(REPO), folder=str(tiny_edit_repo)))
    assert result["size"] == [64, 64] and result["tokenizer"] == "QwenTokenizer"
    imported = set(result["transformers"])
    assert "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl" in imported  # the vision tower
    alone = set(run_fresh(VISION_MODULE_ALONE))
    assert imported <= alone, sorted(imported - alone)  # nothing beyond what the modeling module needs
    # none of the Qwen tokenizers, image processors or processors of transformers (its generic
    # tokenizer base comes with the modeling module, it is in `alone`)
    unwanted = [m for m in imported if m.startswith(("transformers.models.qwen2.", "transformers.models.qwen2_vl",
                                                     "transformers.models.qwen2_5_vl.processing"))]
    assert unwanted == []
    families = sorted({m.split(".")[2] for m in imported if m.startswith("transformers.models.")})
    report(capsys, f"edit (model families imported: {', '.join(families)})", result)
