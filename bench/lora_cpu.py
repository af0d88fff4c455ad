"""LoRA costs on this CPU at full width (inner 3072 = 24 heads x 128, joint dim 3584).

    python bench/lora_cpu.py [--blocks 2] [--size 256] [--repeats 5] [--dtype float32]
    python bench/lora_cpu.py --device cuda --dtype bfloat16 --blocks 8 --size 1024   # on a GPU

- cold: load + fuse a rank-64 LoRA over every linear layer of the blocks (from a state dict and
  from a safetensors file), and clear_lora (the exact restore);
- hot: seconds per DiT forward with a rank-32 hot LoRA on the same layers vs the fused model
  (interleaved runs; the overhead is the median of the paired ratios; goal <= 5%);
- alpha change in place: hot (a float) and cold (re-fuse from the kept originals).
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
from pipelines.core.lora import clear_lora, load_lora
from pipelines.demo.lora import lora_state_dict, random_lora, save_lora
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams

DEVICE = torch.device("cpu")


def build_model(blocks: int, dtype: torch.dtype) -> QwenImageDiT:
    with torch.device("meta"):
        model = QwenImageDiT(QwenImageDiTParams(num_layers=blocks))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.float32)
        t.normal_(1.0 if (p.ndim == 1 and "norm" in name) else 0.0, 0.1 if p.ndim == 1 else 0.02, generator=gen)
        state[name] = t.to(DEVICE, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def block_linear_shapes(model: QwenImageDiT) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.ndim == 2}


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (tokens = (size/16)^2)")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = build_model(args.blocks, dtype)
    shapes = block_linear_shapes(model)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    rows: list[tuple[str, str]] = []
    print(f"DiT: {args.blocks} blocks at full width, {dtype} on {DEVICE}, {args.threads} CPU threads; LoRA on "
          f"{len(shapes)} block linears ({n_params / 1e6:.0f} M weights)")

    # ---------------------------------------------------------------- cold, rank 64
    lora64 = random_lora(shapes, rank=64, seed=1)
    state64 = lora_state_dict(lora64, "diffusers")
    fuse = []
    for _ in range(2):
        fuse.append(timed(lambda: load_lora(model, state64, alpha=0.8)))
        clear_lora(model)
    rows.append(("cold load + fuse, rank 64, from a state dict", f"{min(fuse):.3f} s"))
    with tempfile.TemporaryDirectory() as folder:
        path = save_lora(Path(folder) / "lora64.safetensors", lora64, "kohya")
        from_file = timed(lambda: load_lora(model, path, alpha=0.8))
    alpha_cold = timed(lambda: _set_last_alpha(model, 0.5))
    clear = timed(lambda: clear_lora(model))
    rows.append(("cold load + fuse, rank 64, from a kohya file", f"{from_file:.3f} s"))
    rows.append(("cold alpha change in place (re-fuse), rank 64", f"{alpha_cold:.3f} s"))
    rows.append(("clear_lora after cold (exact restore)", f"{clear:.3f} s"))
    del lora64, state64

    # ---------------------------------------------------------------- hot vs fused, rank 32
    lora32 = lora_state_dict(random_lora(shapes, rank=32, seed=2), "diffusers")
    h = w = args.size // 16
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, h * w, 64, generator=gen).to(DEVICE, dtype), torch.tensor([0.5], device=DEVICE),
              torch.randn(1, args.text_tokens, 3584, generator=gen).to(DEVICE, dtype), None, h, w)

    def forward() -> float:
        with torch.inference_mode():
            return timed(lambda: model(*inputs))

    fused_model_load = timed(lambda: load_lora(model, lora32, alpha=1.0))
    forward()  # warm-up
    fused_times, hot_times = [], []
    for _ in range(args.repeats):
        fused_times.append(forward())
        clear_lora(model)
        load_lora(model, lora32, alpha=1.0, hot=True)
        hot_times.append(forward())
        clear_lora(model)
        load_lora(model, lora32, alpha=1.0)
    clear_lora(model)
    ratios = [hot / fused for hot, fused in zip(hot_times, fused_times)]
    handle = load_lora(model, lora32, alpha=1.0, hot=True)
    alpha_hot = min(timed(lambda: handle.set_alpha(a)) for a in (0.3, 0.6, 0.9))
    clear_lora(model)
    rows.append((f"forward, fused rank 32 ({h * w}+{args.text_tokens} tokens)",
                 f"{statistics.median(fused_times):.3f} s"))
    rows.append(("forward, hot rank 32", f"{statistics.median(hot_times):.3f} s"))
    rows.append(("hot overhead per forward (median of paired ratios)",
                 f"{100 * (statistics.median(ratios) - 1):+.1f} %  (goal <= 5 %)"))
    rows.append(("hot alpha change in place", f"{alpha_hot * 1e6:.1f} us"))
    rows.append(("cold load + fuse, rank 32, from a state dict", f"{fused_model_load:.3f} s"))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _set_last_alpha(model: torch.nn.Module, alpha: float) -> None:
    from pipelines.core.lora import loaded_loras

    loaded_loras(model)[-1].set_alpha(alpha)


if __name__ == "__main__":
    main()
