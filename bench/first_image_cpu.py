"""Time to the first image on this CPU: ours vs diffusers, the same files, fresh processes.

    python bench/first_image_cpu.py [--repeats 5] [--dir /tmp/first_image_bench] [--out results.json]
    python bench/first_image_cpu.py --only-tiny     # the tiny model's start-up stages only (a minute)

The checkpoint (written once into --dir by diffusers' own save_pretrained, so both libraries
load the very same files): a full-width Qwen-Image DiT (3072 wide, 24 heads) with 2 blocks
(2.84 GB in float32), a tiny Qwen2.5-VL text encoder (real vocabulary) and a tiny VAE. Each
measurement is a fresh process; the files are in the page cache (read once beforehand).

Per library, in one process each, wall seconds and process CPU seconds (all threads; these
move less when other processes share the machine):
  import   importing the library's pipeline module
  load     from_pretrained (everything a load defers, e.g. to page faults, lands in `first`)
  first    the first image after the load: 512x512, 2 steps, CFG (4 DiT forwards)
  total    import + load + first: what a user waits for, from `import` to the image
  warm     a second image in the same process
  peak     peak resident memory of the process (VmHWM)
Reading speed, in processes of their own (the DiT file only): a plain sequential read of the
file into one fresh buffer, our load_model, diffusers' from_pretrained, each with every page of
the result touched (diffusers keeps float32 weights as views over a memory map of the file: no
copy, pages mapped as touched); in GB/s. Import stages: `import torch`, our pipeline module,
transformers' Qwen2.5-VL model module (only an edit imports it, for the vision tower: our text
encoder and tokenizer do without transformers), diffusers' pipeline. The tiny model
(pipelines.demo.qwen_image_tiny): each stage from process start to its first 128x128 image, and whether
transformers got imported on the way.

Ratios are ours / diffusers of the medians; other processes on the machine disturb single
runs, so rerun with more --repeats when the CPU is shared (the minimums are printed too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red fox sitting in fresh snow, soft morning light"
TEXT_HIDDEN = 32
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
PIPE_MODES = ("pipe-ours", "pipe-diffusers")
READ_MODES = ("read-plain", "read-ours", "read-diffusers")


def peak_mb() -> float:
    """VmHWM: starts afresh at exec (unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# ---------------------------------------------------------------- the checkpoint


def write_checkpoint(folder: Path, blocks: int) -> None:
    """diffusers' QwenImagePipeline with random weights, saved by its save_pretrained."""
    import shutil
    import tempfile

    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(REPO))
    from pipelines.demo.tokenizer import build_qwen_tokenizer
    from tests.support.weights import randomize_

    print(f"writing the checkpoint into {folder} (once)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
    try:
        transformer = randomize_(QwenImageTransformer2DModel(num_layers=blocks, joint_attention_dim=TEXT_HIDDEN),
                                 seed=1)
        vae = randomize_(AutoencoderKLQwenImage(
            base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD), seed=2)
        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=152064, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
                max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                               out_hidden_size=TEXT_HIDDEN, fullatt_block_indexes=[0]))
        text_encoder = randomize_(Qwen2_5_VLForConditionalGeneration(config), seed=3)
        scheduler = FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
            num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
            use_dynamic_shifting=True)
        tokenizer = AutoTokenizer.from_pretrained(build_qwen_tokenizer(staging / "_tokenizer"))
        pipe = QwenImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                                 tokenizer=tokenizer, transformer=transformer.eval())
        pipe.save_pretrained(staging / "repo")
        shutil.rmtree(staging / "_tokenizer")
        del pipe, transformer
        os.replace(staging / "repo", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# ---------------------------------------------------------------- children


def touch_every_page(tensors) -> None:
    """Memory-mapped loads defer reading: fault every page in, so all methods end loaded."""
    import torch

    for tensor in tensors:
        if tensor.numel():
            tensor.reshape(-1).view(torch.uint8)[::4096].sum()


def read_whole(file: Path, buffer: memoryview) -> None:
    """One sequential read after the other (a single read call stops short of 2 GiB on Linux)."""
    with open(file, "rb", buffering=0) as f:
        done = 0
        while done < len(buffer):
            n = f.readinto(buffer[done:])
            if not n:
                raise EOFError(f"{file} is shorter than {len(buffer)} bytes")
            done += n


def child_read(mode: str, folder: Path) -> dict:
    import torch

    torch.set_num_threads(2)
    dit = folder / "transformer"
    files = weight_files(dit)
    nbytes = sum(f.stat().st_size for f in files)
    if mode == "read-plain":
        start = time.perf_counter()
        for file in files:
            buffer = torch.empty(file.stat().st_size, dtype=torch.uint8)  # fresh pages, as a load's
            read_whole(file, memoryview(buffer.numpy()))
        seconds = time.perf_counter() - start
    elif mode == "read-ours":
        sys.path.insert(0, str(REPO))
        from pipelines.core.loader import load_model
        from pipelines.models.qwen_image_dit import QwenImageDiT

        start = time.perf_counter()
        model = load_model([dit], (QwenImageDiT,), torch.float32, "cpu")
        touch_every_page(model.state_dict().values())
        seconds = time.perf_counter() - start
    else:
        from diffusers import QwenImageTransformer2DModel

        QwenImageTransformer2DModel.__name__  # resolve the lazy import before the clock starts
        start = time.perf_counter()
        model = QwenImageTransformer2DModel.from_pretrained(dit, torch_dtype=torch.float32)
        touch_every_page(model.state_dict().values())
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, "peak_mb": peak_mb()}


def child_pipe(mode: str, folder: Path, steps: int, size: int) -> dict:
    """Wall and process CPU seconds (all threads) of each stage: the CPU seconds move less
    when other processes share the machine."""
    import torch

    torch.set_num_threads(2)
    marks = [("start", time.perf_counter(), time.process_time())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter(), time.process_time()))

    if mode == "pipe-ours":
        sys.path.insert(0, str(REPO))
        from pipelines.qwen_image import ModelConfig, QwenImagePipeline

        mark("import")
        transformers_before = any(m.startswith("transformers") for m in sys.modules)
        pipe = QwenImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=folder / name) for name in ("transformer", "text_encoder", "vae")],
            tokenizer_config=ModelConfig(path=folder / "tokenizer"))

        def generate():
            return pipe(PROMPT, negative_prompt=" ", cfg_scale=4.0, height=size, width=size, seed=0,
                        num_inference_steps=steps, progress_bar=False)
    else:
        from diffusers import QwenImagePipeline

        mark("import")
        transformers_before = any(m.startswith("transformers") for m in sys.modules)
        pipe = QwenImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            return pipe(PROMPT, negative_prompt=" ", true_cfg_scale=4.0, height=size, width=size,
                        num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    mark("load")
    generate()
    mark("first")
    transformers_after = any(m.startswith("transformers") for m in sys.modules)
    generate()
    mark("warm")
    result = {}
    for (_, wall0, cpu0), (name, wall1, cpu1) in zip(marks, marks[1:]):
        result[name], result[f"cpu_{name}"] = wall1 - wall0, cpu1 - cpu0
    for prefix in ("", "cpu_"):
        result[f"{prefix}total"] = sum(result[f"{prefix}{name}"] for name in ("import", "load", "first"))
    return {**result, "peak_mb": peak_mb(), "transformers_at_import": transformers_before,
            "transformers_at_first_image": transformers_after}


STAGES = {
    "torch": "import torch",
    "pipelines.qwen_image": "from pipelines.qwen_image import QwenImagePipeline",
    "transformers Qwen2.5-VL (edits)": "from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl",
    "diffusers QwenImagePipeline": "from diffusers import QwenImagePipeline; QwenImagePipeline.__name__",
}


def child_imports() -> dict:
    """Seconds of each stage, in this order, in this fresh process."""
    sys.path.insert(0, str(REPO))
    seconds = {}
    for name, statement in STAGES.items():
        start = time.perf_counter()
        exec(statement, {})
        seconds[name] = time.perf_counter() - start
    return seconds


TINY_STAGES = ("import torch", "import pipelines.qwen_image", "load (DiT, text encoder, VAE, tokenizer)",
               "first image")


def child_tiny(folder: Path, steps: int) -> dict:
    """The project's tiny model (pipelines.demo.qwen_image_tiny): wall and CPU seconds of each stage from
    the start of this process to its first 128x128 image, and whether transformers was imported
    on the way (text-to-image does not need it)."""
    marks = [(time.perf_counter(), time.process_time())]
    import torch

    marks.append((time.perf_counter(), time.process_time()))
    torch.set_num_threads(2)
    sys.path.insert(0, str(REPO))
    from pipelines.qwen_image import ModelConfig, QwenImagePipeline

    marks.append((time.perf_counter(), time.process_time()))
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=folder / name) for name in ("transformer", "text_encoder", "vae")],
        tokenizer_config=ModelConfig(path=folder / "tokenizer"))
    marks.append((time.perf_counter(), time.process_time()))
    pipe(PROMPT, negative_prompt=" ", cfg_scale=4.0, height=128, width=128, seed=0, num_inference_steps=steps,
         progress_bar=False)
    marks.append((time.perf_counter(), time.process_time()))
    result: dict = {"transformers imported": any(m.startswith("transformers") for m in sys.modules)}
    for name, (wall0, cpu0), (wall1, cpu1) in zip(TINY_STAGES, marks, marks[1:]):
        result[name], result[f"cpu {name}"] = wall1 - wall0, cpu1 - cpu0
    return result


def report_tiny(runs: list[dict]) -> dict:
    total = statistics.median(sum(r[name] for name in TINY_STAGES) for r in runs)
    print(f"\ntiny model (pipelines.demo.qwen_image_tiny), ours, from process start to the first 128x128 image; "
          f"median of {len(runs)}: wall s, CPU s, share of the wall total ({total:.2f} s)")
    results = {}
    for name in TINY_STAGES:
        wall, cpu = statistics.median(r[name] for r in runs), statistics.median(r[f"cpu {name}"] for r in runs)
        results[name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"  {name:<42} {wall:6.2f} {cpu:6.2f} {wall / total:6.0%}")
    print(f"  transformers imported on the way: {sorted({r.get('transformers imported') for r in runs}, key=str)}")
    return results


# ---------------------------------------------------------------- parent


def run_child(args: argparse.Namespace, mode: str) -> dict:
    command = [sys.executable, __file__, "--dir", str(args.dir), "--blocks", str(args.blocks), "--steps",
               str(args.steps), "--size", str(args.size), "--child", mode]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.median(values), min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/first_image_bench"))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reads", action="store_true", help="no reading-speed runs")
    parser.add_argument("--only-tiny", action="store_true", help="only the tiny model's stages")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / f"qwen-image-dit{args.blocks}"
    if args.child:
        if args.child == "imports":
            result = child_imports()
        elif args.child == "tiny":
            result = child_tiny(args.dir / "tiny", args.steps)
        elif args.child in READ_MODES:
            result = child_read(args.child, folder)
        else:
            result = child_pipe(args.child, folder, args.steps, args.size)
        print(json.dumps(result))
        return
    if not (args.dir / "tiny").exists():
        sys.path.insert(0, str(REPO))
        from pipelines.demo.qwen_image_tiny import build_tiny_repo

        build_tiny_repo(args.dir / "tiny")
    if not args.only_tiny and not (folder / "model_index.json").exists():
        write_checkpoint(folder, args.blocks)
    files = [f for sub in ("transformer", "text_encoder", "vae") for f in weight_files(folder / sub)]
    for file in files:  # into the page cache
        subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)

    modes = ["tiny"] if args.only_tiny else (
        list(PIPE_MODES) + ([] if args.skip_reads else list(READ_MODES)) + ["imports", "tiny"])
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        order = modes if repeat % 2 == 0 else modes[::-1]  # alternate, so drifting load hits both alike
        for mode in order:
            runs[mode].append(run_child(args, mode))
            print(f"repeat {repeat + 1}/{args.repeats} {mode}: {json.dumps(runs[mode][-1])}", flush=True)
    if args.only_tiny:
        tiny = report_tiny(runs["tiny"])
        if args.out:
            args.out.write_text(json.dumps({"runs": runs, "results": {"tiny": tiny}}, indent=1))
        return
    report(args, folder, runs)


def report(args: argparse.Namespace, folder: Path, runs: dict[str, list[dict]]) -> None:
    dit_gb = sum(f.stat().st_size for f in weight_files(folder / "transformer")) / 1e9
    results: dict = {"checkpoint": str(folder), "dit_gb": dit_gb, "repeats": args.repeats, "pipe": {}, "read": {},
                     "imports_s": {}}
    print(f"\nQwen-Image DiT {args.blocks} blocks x 3072 ({dit_gb:.2f} GB float32), tiny text encoder and VAE; "
          f"{args.size}x{args.size}, {args.steps} steps with CFG, float32, 2 threads; median (min) of "
          f"{args.repeats} fresh processes each; wall seconds, then process CPU seconds (all threads)")
    for run in runs["pipe-ours"] + runs["pipe-diffusers"]:
        for prefix in ("", "cpu_"):
            run[f"{prefix}load+first"] = run[f"{prefix}load"] + run[f"{prefix}first"]
    print(f"{'':<18} {'ours':>16} {'diffusers':>16} {'ratio':>6} {'min ratio':>10}")
    for prefix, unit in (("", "wall s"), ("cpu_", "CPU s")):
        for key in ("import", "load", "first", "load+first", "total", "warm"):
            name = f"{prefix}{key}"
            (o, omin), (d, dmin) = summarise(runs["pipe-ours"], name), summarise(runs["pipe-diffusers"], name)
            results["pipe"][name] = {"ours": o, "diffusers": d, "ratio": o / d, "min_ratio": omin / dmin}
            print(f"{key + ' ' + unit:<18} {o:7.2f} ({omin:6.2f}) {d:7.2f} ({dmin:6.2f}) {o / d:6.2f} "
                  f"{omin / dmin:10.2f}")
    (o, omin), (d, dmin) = summarise(runs["pipe-ours"], "peak_mb"), summarise(runs["pipe-diffusers"], "peak_mb")
    results["pipe"]["peak_mb"] = {"ours": o, "diffusers": d, "ratio": o / d, "min_ratio": omin / dmin}
    print(f"{'peak RSS MiB':<18} {o:7.0f} ({omin:6.0f}) {d:7.0f} ({dmin:6.0f}) {o / d:6.2f} {omin / dmin:10.2f}")
    print("total = import + load + first; goal: load + first (and total) <= 0.8, warm and peak RSS <= 1")
    if "read-plain" in runs:
        plain = summarise(runs["read-plain"], "gb_per_s")
        print(f"\nreading the DiT file ({dit_gb:.2f} GB) from the page cache, GB/s median (max):")
        for mode in READ_MODES:
            speeds = [r["gb_per_s"] for r in runs[mode]]
            median, best = statistics.median(speeds), max(speeds)
            results["read"][mode] = {"gb_per_s": median, "max_gb_per_s": best, "of_plain": median / plain[0]}
            print(f"  {mode:<16} {median:6.2f} ({best:5.2f})  {median / plain[0]:5.2f} x plain read")
        print("  goal: ours >= 0.7 x plain read")
    print("\nimport stages (fresh process, in this order), seconds, median:")
    for stage in STAGES:
        seconds = statistics.median(r[stage] for r in runs["imports"])
        results["imports_s"][stage] = seconds
        print(f"  {stage:<32} {seconds:6.2f}")
    print(f"transformers imported by `import` already: ours {runs['pipe-ours'][0]['transformers_at_import']}, "
          f"diffusers {runs['pipe-diffusers'][0]['transformers_at_import']}; by the first image: ours "
          f"{runs['pipe-ours'][0]['transformers_at_first_image']}, "
          f"diffusers {runs['pipe-diffusers'][0]['transformers_at_first_image']}")
    results["tiny"] = report_tiny(runs["tiny"])
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
