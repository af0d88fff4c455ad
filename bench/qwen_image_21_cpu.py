"""Qwen-Image 2.1 on this CPU: ours vs diffusers' QwenImage21Pipeline, the same files, fresh processes.

    python bench/qwen_image_21_cpu.py [--blocks 2] [--size 256] [--steps 2] [--repeats 3] [--out results.json]

The checkpoint (written once into --dir by diffusers' / transformers' own save_pretrained, so both libraries load
the very same files): a full-width 2.1 DiT (4096 wide, 32 heads of 128, SwiGLU x3) with --blocks blocks, a tiny
Qwen3-VL text encoder (real vocabulary, vision tower) and a tiny 2.1 VAE, the processor folder with Qwen3-VL's real
image settings. The image: one RGBA reference picture at `output_resolution` = --size (its tokens and the prompt's
kept in the KV cache, both libraries' default), the output at the same size, --steps steps with true CFG (two
prompts: 2 x steps DiT forwards), float32, 2 threads.

Per library, in a fresh process each: `load` (from_pretrained of every part), `first` (the first image: what a load
defers, page faults included, lands here), `warm` (a second image in the same process), `peak` (VmHWM, the
process's peak resident memory); wall seconds, then process CPU seconds (all threads: these move less when other
processes share the machine). Ratios are ours / diffusers of the medians (min ratios beside them); goals:
load + first <= 0.9, warm <= 1.0, peak <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a capybara in a wizard hat reading by candlelight, oil painting"
NEGATIVE = "blurry"
MODES = ("ours", "diffusers")
GOALS = {"load+first": 0.9, "warm": 1.0, "peak_mb": 1.0}


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(row for row in f if row.startswith("VmHWM:")).split()[1]) / 1024


def write_checkpoint(folder: Path, blocks: int) -> None:
    """Every part by its library's save_pretrained, written beside and renamed into place."""
    import os
    import shutil
    import tempfile

    import diffusers
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    sys.path.insert(0, str(REPO))
    from pipelines.demo.processor import build_qwen_image_21_processor_folder
    from tests.support.qwen21 import SCHEDULER, TEXT_HIDDEN, TINY_TEXT_CONFIG, TINY_VAE
    from tests.support.weights import randomize_

    print(f"writing the checkpoint into {folder} (once)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        transformer = diffusers.QwenImage21Transformer2DModel(num_layers=blocks, context_in_dim=TEXT_HIDDEN)
        randomize_(transformer, seed=1).save_pretrained(staging / "transformer")
        del transformer
        randomize_(Qwen3VLForConditionalGeneration(Qwen3VLConfig(**TINY_TEXT_CONFIG)), seed=2).save_pretrained(
            staging / "text_encoder", max_shard_size="8MB")
        randomize_(diffusers.AutoencoderKLQwenImage21(**TINY_VAE), seed=3).save_pretrained(staging / "vae")
        diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(staging / "scheduler")
        build_qwen_image_21_processor_folder(staging / "processor")
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reference_picture(size: int):
    sys.path.insert(0, str(REPO))
    from tests.support.qwen21 import picture

    return picture(size, size, "RGBA", seed=1)


def child(mode: str, folder: Path, size: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(REPO))
    marks = [(time.perf_counter(), time.process_time())]
    pictures = [reference_picture(size)]
    if mode == "ours":
        from pipelines import ModelConfig, QwenImage21Pipeline

        pipe = QwenImage21Pipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=folder / part) for part in ("transformer", "text_encoder", "vae")],
            processor_config=ModelConfig(path=folder / "processor"))

        def generate():
            return pipe(PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, edit_image=pictures, output_resolution=size,
                        num_inference_steps=steps, seed=0, progress_bar=False)
    else:
        import diffusers
        from transformers import Qwen3VLForConditionalGeneration

        from tests.support.qwen21 import qwen3_vl_processor  # Qwen3VLProcessor without torchvision

        pipe = diffusers.QwenImage21Pipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            vae=diffusers.AutoencoderKLQwenImage21.from_pretrained(folder / "vae", torch_dtype=torch.float32),
            text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=torch.float32),
            processor=qwen3_vl_processor(folder / "processor", {}),
            transformer=diffusers.QwenImage21Transformer2DModel.from_pretrained(folder / "transformer",
                                                                                torch_dtype=torch.float32))
        pipe.set_progress_bar_config(disable=True)

        def generate():
            return pipe(prompt=PROMPT, image=pictures, negative_prompt=NEGATIVE, true_cfg_scale=4.0,
                        output_resolution=size, num_inference_steps=steps,
                        generator=torch.Generator("cpu").manual_seed(0)).images[0]
    marks.append((time.perf_counter(), time.process_time()))
    first = generate()
    marks.append((time.perf_counter(), time.process_time()))
    generate()
    marks.append((time.perf_counter(), time.process_time()))
    result = {"peak_mb": peak_mb(), "size": list(first.size), "mode": first.mode}
    for clock, prefix in ((0, ""), (1, "cpu_")):
        load, first_s, warm = (b[clock] - a[clock] for a, b in zip(marks, marks[1:]))
        result.update({f"{prefix}load": load, f"{prefix}first": first_s, f"{prefix}load+first": load + first_s,
                       f"{prefix}warm": warm})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qwen_image_21_bench"))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / f"qwen-image-21-dit{args.blocks}"
    if args.child:
        print(json.dumps(child(args.child, folder, args.size, args.steps)))
        return
    if not folder.exists():
        write_checkpoint(folder, args.blocks)
    for file in folder.rglob("*.safetensors"):  # into the page cache
        subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:  # alternate: drifting load hits both alike
            command = [sys.executable, __file__, "--dir", str(args.dir), "--blocks", str(args.blocks), "--size",
                       str(args.size), "--steps", str(args.steps), "--child", mode]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{mode} failed:\n{out.stderr[-4000:]}")
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: {json.dumps(runs[mode][-1])}", flush=True)
    report(args, folder, runs)


def report(args: argparse.Namespace, folder: Path, runs: dict[str, list[dict]]) -> None:
    dit_gb = sum(f.stat().st_size for f in (folder / "transformer").glob("*.safetensors")) / 1e9
    print(f"\nQwen-Image 2.1 DiT {args.blocks} blocks x 4096 ({dit_gb:.2f} GB float32), tiny text encoder and VAE; "
          f"one RGBA picture, {args.size}x{args.size}, {args.steps} steps with CFG, float32, 2 threads; median (min) "
          f"of {args.repeats} fresh processes")
    print(f"{'':<18} {'ours':>16} {'diffusers':>16} {'ratio':>6} {'min ratio':>10} {'goal':>6}")
    results = {}
    for key in ("load", "first", "load+first", "warm", "cpu_load", "cpu_first", "cpu_load+first", "cpu_warm",
                "peak_mb"):
        ours, theirs = ([r[key] for r in runs[mode]] for mode in MODES)
        o, d = statistics.median(ours), statistics.median(theirs)
        results[key] = {"ours": o, "diffusers": d, "ratio": o / d, "min_ratio": min(ours) / min(theirs)}
        goal = f"<= {GOALS[key.removeprefix('cpu_')]}" if key.removeprefix("cpu_") in GOALS else ""
        unit = "MiB" if key == "peak_mb" else "CPU s" if key.startswith("cpu_") else "s"
        name = key.removeprefix("cpu_") + " " + unit
        print(f"{name:<18} {o:7.2f} ({min(ours):6.2f}) {d:7.2f} ({min(theirs):6.2f}) {o / d:6.2f} "
              f"{min(ours) / min(theirs):10.2f} {goal:>6}")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "results": results, "dit_gb": dit_gb}, indent=1))


if __name__ == "__main__":
    main()
