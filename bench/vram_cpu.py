"""Overhead of the VRAM-management wrappers with everything on the CPU, against the unwrapped model.

    python bench/vram_cpu.py               # about a minute on 2 idle cores; goal: overhead <= 3%

A mid-size Qwen-Image DiT (6 blocks, inner dim 1024: 231 M parameters, the real block layout)
is written once as safetensors, then loaded twice: plainly (`load_model`), and VRAM-managed with
every place equal to the computation one (offload cpu/float32 = computation), where every layer
runs through its wrapper's fast path. The forwards are timed interleaved, and the overhead is the median
of the ratios of adjacent runs (robust to the load of other processes on a shared machine), and
the ratio of the minimums. A micro-benchmark gives the wrapper's cost per call, and from it the
share of a full-size GPU forward. For information it also times a layer-streaming setting (bfloat16 storage, float32
computation: a cast per layer and forward), which is not what the goal is about.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.core import vram  # noqa: E402
from pipelines.core.loader import load_model, parameters_on_meta  # noqa: E402
from pipelines.demo.checkpoints import random_state_dict, save_sharded  # noqa: E402
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams  # noqa: E402

PARAMS = QwenImageDiTParams(num_layers=6, attention_head_dim=64, num_attention_heads=16, joint_attention_dim=512,
                            axes_dims_rope=(8, 28, 28))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=int, default=8, help="image tokens = grid**2")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with parameters_on_meta():
            shapes = {k: tuple(v.shape) for k, v in QwenImageDiT(PARAMS).state_dict().items()}
        save_sharded(random_state_dict(shapes, seed=0), folder, "diffusion_pytorch_model", 1)
        plain = load_model([folder], [QwenImageDiT], torch.float32, "cpu")
        settings = {
            "fast path (all cpu/float32)": dict(offload_device="cpu", offload_dtype="float32"),
            "streaming (bfloat16 storage)": dict(offload_device="cpu", offload_dtype="bfloat16",
                                                 onload_dtype="bfloat16"),
        }
        managed = {name: vram.load_managed([folder], [QwenImageDiT], vram.VramSettings.from_keys(
            keys, torch.float32, "cpu")) for name, keys in settings.items()}
        for model in managed.values():
            vram.manager_of(model).onload()

        g = torch.Generator().manual_seed(0)
        grid = args.grid
        inputs = (torch.randn(1, grid * grid, PARAMS.in_channels, generator=g), torch.tensor([0.6]),
                  torch.randn(1, args.text_tokens, PARAMS.joint_attention_dim, generator=g), None, grid, grid)
        models = {"unwrapped": plain, **managed}
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            expected = plain(*inputs)
            for name, model in managed.items():  # warm-up, and the fast path computes the very same thing
                out = model(*inputs)
                if name.startswith("fast"):
                    assert torch.equal(out, expected), "the wrapped model computes something else"
            for _ in range(args.pairs):  # adjacent runs: slow drifts of the machine's load cancel in the ratios
                for name, model in models.items():
                    t0 = time.perf_counter()
                    model(*inputs)
                    times[name].append(time.perf_counter() - t0)

    n_params = sum(p.numel() for p in plain.parameters())
    calls = sum(1 for m in plain.modules() if m._parameters)
    print(f"Qwen-Image DiT, {n_params / 1e6:.0f} M parameters ({calls} wrapped layers), {grid * grid} image + "
          f"{args.text_tokens} text tokens, float32, {args.threads} threads; {args.pairs} interleaved forwards each")
    base = times["unwrapped"]
    print(f"{'model':<30} {'median ms':>10} {'min ms':>8} {'overhead: paired median':>24} {'of mins':>8}")
    for name, values in times.items():
        paired = statistics.median(v / b for v, b in zip(values, base))
        print(f"{name:<30} {statistics.median(values) * 1e3:>10.2f} {min(values) * 1e3:>8.2f} "
              f"{(paired - 1) * 100:>23.1f}% {(min(values) / min(base) - 1) * 100:>7.1f}%")

    per_call = wrapper_cost_us()
    with parameters_on_meta():
        full = QwenImageDiT(QwenImageDiTParams())
    full_calls = sum(1 for m in full.modules() if m._parameters)
    forward_s = 0.27  # the resident bf16 forward at 1328x1328 on an H100 (bench/results/gpu_dit_h100.json)
    print(f"fast-path cost per wrapped call: {per_call:.2f} us (min over repeats, nn.Linear(64, 64)); the "
          f"full-size DiT makes {full_calls} calls per forward: {full_calls * per_call / 1e3:.2f} ms against a "
          f"{forward_s * 1e3:.0f} ms forward on an H100 = {full_calls * per_call / 1e4 / forward_s:.2f}%")
    print("goal: the fast path's overhead <= 3%")


def wrapper_cost_us(calls: int = 20000, repeats: int = 7) -> float:
    """Extra time of one call through a fast-path wrapper, from the minimum over repeats."""
    plain = torch.nn.Linear(64, 64)
    wrapped = torch.nn.Linear(64, 64)
    wrapped.load_state_dict(plain.state_dict())
    vram.enable_vram_management(wrapped, vram.VramSettings.from_keys(dict(offload_device="cpu"), torch.float32, "cpu"))
    x = torch.randn(1, 64)
    best = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, layer in (("plain", plain), ("wrapped", wrapped)):
                t0 = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / calls)
    return (best["wrapped"] - best["plain"]) * 1e6


if __name__ == "__main__":
    main()
