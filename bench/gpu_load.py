"""Loading the full Qwen-Image DiT from the page cache onto a GPU: GB/s, ours vs diffusers.

    python bench/gpu_load.py                        # H100/H200: 60 blocks, 40.9 GB in bf16, 9 shards
    python bench/gpu_load.py --device cpu --small   # a toy checkpoint on the CPU: checks the script end to end

A random-weight checkpoint with the real DiT's key names and shapes (diffusers' layout: shards
of --shard-gb with a model index and config.json) is written once into --dir; --blocks sets the
size. The files are read once into the page cache, then each method runs in a fresh process
(imports and the CUDA context made before the clock starts), --repeats times, interleaved:

  plain      a sequential `readinto` of every shard into one reused 64 MiB buffer (what one
             reader gets out of the page cache; nothing goes to the device)
  ours       pipelines.core.loader.load_model(..., torch_dtype, device)
  diffusers  QwenImageTransformer2DModel.from_pretrained(..., torch_dtype, device_map=device)
             (accelerate; on the CPU without device_map)
  diffusers+to  from_pretrained(..., torch_dtype) on the host, then .to(device) (GPU only)

Each load ends with a device synchronisation. GB/s = checkpoint bytes / seconds (median of the
repeats). The methods must give the same weights: a checksum of a few tensors is compared.
Needs torch, safetensors and this repository; diffusers (and accelerate, which peft brings) for
its columns. Prints one JSON line; with $OUT set it also writes $OUT/gpu_load.json.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from pipelines.core.loader import load_model, parameters_on_meta  # noqa: E402
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams  # noqa: E402

SMALL = QwenImageDiTParams(num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                           axes_dims_rope=(4, 14, 14))
CHECKED = ("img_in.weight", "transformer_blocks.0.attn.to_q.weight", "proj_out.weight")


def params_of(args: argparse.Namespace) -> QwenImageDiTParams:
    return SMALL if args.small else QwenImageDiTParams(num_layers=args.blocks)


def config_json(p: QwenImageDiTParams) -> dict:
    return {"_class_name": "QwenImageTransformer2DModel", "patch_size": p.patch_size, "in_channels": p.in_channels,
            "out_channels": p.out_channels, "num_layers": p.num_layers, "attention_head_dim": p.attention_head_dim,
            "num_attention_heads": p.num_attention_heads, "joint_attention_dim": p.joint_attention_dim,
            "guidance_embeds": False, "axes_dims_rope": list(p.axes_dims_rope)}


def write_checkpoint(folder: Path, params: QwenImageDiTParams, dtype: torch.dtype, shard_bytes: int,
                     device: torch.device) -> None:
    """Shards of about `shard_bytes`, random values made on `device`, one shard in memory at a time."""
    from safetensors.torch import save_file

    with parameters_on_meta():
        shapes = {k: tuple(v.shape) for k, v in QwenImageDiT(params).state_dict().items()}
    groups, size = [[]], 0
    for key, shape in shapes.items():
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {k: (torch.randn(shapes[k], generator=generator, device=device) * 0.02).to(dtype).cpu() for k in keys}
        save_file(state, str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        print(f"wrote {name} ({sum(t.nbytes for t in state.values()) / 1e9:.1f} GB)", file=sys.stderr, flush=True)
        del state
    total = sum(dtype.itemsize * int(torch.Size(s).numel()) for s in shapes.values())
    (staging / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (staging / "config.json").write_text(json.dumps(config_json(params), indent=1))
    staging.rename(folder)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checksum(state: dict[str, torch.Tensor]) -> list[float]:
    return [state[k].double().sum().item() for k in CHECKED]


def child(mode: str, folder: Path, dtype: torch.dtype, device: torch.device) -> dict:
    files = shard_files(folder)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before the clock
    if mode.startswith("diffusers"):
        from diffusers import QwenImageTransformer2DModel
    buffer = bytearray(64 << 20) if mode == "plain" else None
    start = time.perf_counter()
    if mode == "plain":
        for file in files:
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        seconds, sums = time.perf_counter() - start, None
    else:
        if mode == "ours":
            model = load_model([folder], (QwenImageDiT,), dtype, device)
        elif mode == "diffusers" and device.type == "cuda":
            model = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, device_map=str(device))
        elif mode == "diffusers":
            model = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
        else:
            model = QwenImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        synchronize(device)
        seconds = time.perf_counter() - start
        state = model.state_dict()
        assert all(t.device.type == device.type for t in state.values()), f"{mode}: weights not all on {device}"
        sums = checksum(state)
    nbytes = sum(f.stat().st_size for f in files)
    return {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, "checksum": sums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="stored and loaded dtype")
    parser.add_argument("--blocks", type=int, default=60, help="transformer blocks (60: the real model)")
    parser.add_argument("--small", action="store_true", help="a toy model (smoke check)")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gpu_load_bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    params = params_of(args)
    folder = args.dir / f"dit-{'small' if args.small else params.num_layers}-{args.dtype}"
    if args.child:
        print(json.dumps(child(args.child, folder, dtype, device)))
        return
    if not (folder / "config.json").exists():
        generator_device = device if device.type == "cuda" else torch.device("cpu")
        write_checkpoint(folder, params, dtype, int(args.shard_gb * 1e9), generator_device)
    for file in shard_files(folder):  # into the page cache
        subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)
    try:
        import diffusers  # noqa: F401

        methods = ["plain", "ours", "diffusers"] + (["diffusers+to"] if device.type == "cuda" else [])
    except ImportError:
        methods = ["plain", "ours"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    base = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--blocks", str(args.blocks),
            "--dir", str(args.dir)] + (["--small"] if args.small else [])
    errors = {}
    for repeat in range(args.repeats):
        for method in (methods if repeat % 2 == 0 else methods[::-1]):
            if method in errors:
                continue
            out = subprocess.run(base + ["--child", method], capture_output=True, text=True)
            if out.returncode:
                errors[method] = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
                print(f"{method} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    gb = sum(f.stat().st_size for f in shard_files(folder)) / 1e9
    speed = {m: statistics.median(r["gb_per_s"] for r in rs) for m, rs in runs.items() if rs}
    sums = {m: rs[0]["checksum"] for m, rs in runs.items() if rs and rs[0]["checksum"] is not None}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "checkpoint_gb": round(gb, 3), "shards": len(shard_files(folder)), "dtype": args.dtype,
        "repeats": args.repeats, "gb_per_s": {m: round(v, 3) for m, v in speed.items()},
        "ours_over_plain_read": round(speed["ours"] / speed["plain"], 3) if "ours" in speed else None,
        "ours_over_diffusers": {m: round(speed["ours"] / speed[m], 3) for m in speed if m.startswith("diffusers")
                                and "ours" in speed},
        "same_weights": len({json.dumps(s) for s in sums.values()}) <= 1,
        "errors": errors,
    }
    print(json.dumps(result))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_load.json").write_text(json.dumps({"result": result, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
