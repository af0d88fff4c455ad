"""Loading a >= 2 GB safetensors checkpoint from the page cache, on this CPU.

    python bench/load_cpu.py [--blocks 4] [--repeats 3] [--dir /tmp/load_bench]

A full-width Qwen-Image DiT (3072 wide) with a few blocks, stored in bfloat16, loaded in
bfloat16 and in float32. Each measurement runs in a fresh process: seconds, GB/s of file bytes
and peak RSS growth for a plain read of the same bytes (one `readinto` into a fresh buffer), for
our loader and for diffusers' from_pretrained, each with every page of the result touched (a
memory-mapped load defers reading to the first use). Goals: ours >= 0.7 x the plain read's
GB/s; ours' peak RSS / result bytes <= 1.15.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    # VmHWM starts afresh at exec, unlike ru_maxrss, which a child inherits from its parent
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def touch_every_page(model) -> None:
    """Memory-mapped loaders defer reading: fault every page in so all methods end loaded."""
    for tensor in model.state_dict().values():
        tensor.reshape(-1).view(torch.uint8)[::4096].sum()


def write_checkpoint(folder: Path, blocks: int) -> Path:
    from pipelines.core.loader import parameters_on_meta
    from pipelines.demo.checkpoints import random_state_dict, save_sharded, write_json
    from pipelines.demo.qwen_image_tiny import dit_config
    from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams

    params = QwenImageDiTParams(num_layers=blocks)
    with parameters_on_meta():
        shapes = {k: tuple(v.shape) for k, v in QwenImageDiT(params).state_dict().items()}
    state = {k: v.to(torch.bfloat16) for k, v in random_state_dict(shapes, seed=0).items()}
    save_sharded(state, folder, "diffusion_pytorch_model", 1)
    write_json(folder / "config.json", dit_config(params))
    return folder / "diffusion_pytorch_model.safetensors"


def measure(method: str, folder: Path) -> dict:
    method, _, dtype_name = method.partition(" ")
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    file = folder / "diffusion_pytorch_model.safetensors"
    if method == "diffusers":
        from diffusers import QwenImageTransformer2DModel
    else:
        from pipelines.core.loader import load_model
        from pipelines.models.qwen_image_dit import QwenImageDiT
    before = rss_mb()
    start = time.perf_counter()
    if method == "plain":
        buffer = memoryview(torch.empty(file.stat().st_size, dtype=torch.uint8).numpy())  # fresh pages, like ours
        with open(file, "rb", buffering=0) as f:
            done = 0
            while done < len(buffer):  # a single read call stops short of 2 GiB on Linux
                n = f.readinto(buffer[done:])
                if not n:
                    raise EOFError(f"{file} ended early")
                done += n
    elif method == "ours":
        touch_every_page(load_model([folder], (QwenImageDiT,), dtype, "cpu"))
    else:
        touch_every_page(QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_growth_mb": peak_mb() - before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/load_bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / f"dit-{args.blocks}"
    if args.child:
        print(json.dumps(measure(args.child, folder)))
        return
    if not (folder / "config.json").exists():
        write_checkpoint(folder, args.blocks)
    file = folder / "diffusion_pytorch_model.safetensors"
    size_mb = file.stat().st_size / 2**20
    subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    results = {}
    for method in ("plain read", "ours bf16", "diffusers bf16", "ours fp32", "diffusers fp32"):
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--blocks", str(args.blocks), "--dir", str(args.dir),
                                  "--child", method], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[method] = {"seconds": statistics.median(r["seconds"] for r in runs),
                           "peak_growth_mb": max(r["peak_growth_mb"] for r in runs)}
    print(f"checkpoint: {size_mb:.0f} MiB bf16, {args.blocks} full-width blocks; median of {args.repeats}")
    print("bf16 loads keep the stored dtype; fp32 loads cast (the result is twice the file size)")
    print(f"{'method':<16} {'seconds':>8} {'file GB/s':>10} {'peak RSS growth MiB':>20} {'RSS/result bytes':>17}")
    for method, r in results.items():
        result_mb = size_mb * (2 if method.endswith("fp32") else 1)
        print(f"{method:<16} {r['seconds']:8.2f} {size_mb * 2**20 / 1e9 / r['seconds']:10.2f} "
              f"{r['peak_growth_mb']:20.0f} {r['peak_growth_mb'] / result_mb:17.2f}")
    plain = results["plain read"]["seconds"]
    for dtype in ("bf16", "fp32"):
        ours, theirs = results[f"ours {dtype}"]["seconds"], results[f"diffusers {dtype}"]["seconds"]
        print(f"{dtype}: ours' GB/s / plain read's {plain / ours:.2f} (goal >= 0.7), "
              f"ours' seconds / diffusers' {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
