"""An edit on this CPU: ours vs diffusers' QwenImageEditPlusPipeline, the SAME tiny checkpoint
(written once by diffusers/transformers save_pretrained), the same two pictures, the real
picture areas (~384x384 for the vision-language encoder, ~1024x1024 for the VAE), CFG 4.

    python bench/edit_cpu.py [--repeats 3] [--steps 4] [--threads 2]

Prints seconds per edit (median of interleaved runs, each pipeline loaded once) and
ours/diffusers. diffusers' processor class insists on a video processor (torchvision, which
does not load here): its check is bypassed and it runs with the image processor transformers
builds without torchvision, as in the tests. With transformers 5.x diffusers' edit pipelines
do not give the text encoder the picture positions (see tests/test_edit.py): its embeddings
differ, its work does not.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
PROMPT = "Put the fox on the red cushion from the second picture"
HIDDEN = 32


def write_checkpoint(root: Path):
    """A tiny Qwen-Image-Edit repo written by diffusers/transformers, and diffusers' pipeline."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )
    from transformers.processing_utils import ProcessorMixin

    from pipelines.demo.processor import build_processor_folder
    from tests.support.weights import randomize_

    transformer = randomize_(QwenImageTransformer2DModel(
        num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=HIDDEN,
        axes_dims_rope=(4, 14, 14), zero_cond_t=True), seed=1)
    vae = randomize_(AutoencoderKLQwenImage(base_dim=16, num_res_blocks=1), seed=2)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN,
                           fullatt_block_indexes=[1]))
    text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(config), seed=3)
    processor_dir = build_processor_folder(root / "processor")
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None  # no torchvision here
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(processor_dir),
                                 tokenizer=AutoTokenizer.from_pretrained(processor_dir), video_processor=None)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        module.eval().save_pretrained(root / name)
    return QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                                     tokenizer=processor.tokenizer, processor=processor, transformer=transformer.eval())


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / 640
    out = []
    for size in ((640, 480), (480, 640)):
        waves = [np.sin(7 * x * rng.uniform(0.5, 2)) * np.cos(5 * y * rng.uniform(0.5, 2)) for _ in range(3)]
        out.append(Image.fromarray(((np.stack(waves, -1) + 1) * 127.5).astype(np.uint8)).resize(size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="output height and width")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines import ModelConfig, QwenImagePipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = write_checkpoint(root)
        ours = QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=root / name) for name in ("transformer", "text_encoder", "vae")],
            processor_config=ModelConfig(path=root / "processor"))
        images = pictures()

        def run_ours():
            return ours(PROMPT, negative_prompt=" ", edit_image=images, cfg_scale=4.0, seed=0, height=args.size,
                        width=args.size, num_inference_steps=args.steps, progress_bar=False)

        def run_reference():
            return reference(image=images, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=args.size,
                             width=args.size, num_inference_steps=args.steps,
                             generator=torch.Generator().manual_seed(0)).images[0]

        reference.set_progress_bar_config(disable=True)
        run_ours(), run_reference()  # warm-up
        times = {"ours": [], "diffusers": []}
        cpu = {"ours": [], "diffusers": []}  # process CPU time: less sensitive to other load on the machine
        for i in range(args.repeats):
            order = [("ours", run_ours), ("diffusers", run_reference)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                with torch.inference_mode():
                    fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    print(f"edit with 2 pictures, {args.size}x{args.size}, {args.steps} steps, CFG 4, {args.threads} threads:")
    for label, data in (("wall", times), ("cpu", cpu)):
        ours_s, ref_s = min(data["ours"]), min(data["diffusers"])
        print(f"  {label:4}: ours {ours_s:.2f} s, diffusers {ref_s:.2f} s (minimum of {args.repeats}), "
              f"ours/diffusers {ours_s / ref_s:.2f}; medians {statistics.median(data['ours']):.2f} / "
              f"{statistics.median(data['diffusers']):.2f}")


if __name__ == "__main__":
    main()
