"""DiT forward on this CPU: ours vs diffusers, the SAME weights (shared tensors).

Full width (inner 3072 = 24 heads x 128, joint dim 3584) with 2 blocks, a 512x512 image
(32x32 = 1024 image tokens) and 64 text tokens; float32 and bfloat16; 2 threads.

    python bench/dit_forward_cpu.py [--blocks 2] [--repeats 5] [--dtypes float32 bfloat16]

Prints seconds per forward (median of interleaved runs) and ours/diffusers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams


def build_models(blocks: int, dtype: torch.dtype):
    """Ours with random weights; diffusers built on meta and handed the same tensors."""
    from diffusers import QwenImageTransformer2DModel

    params = QwenImageDiTParams(num_layers=blocks)
    with torch.device("meta"):
        ours = QwenImageDiT(params)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in ours.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.float32)
        if p.ndim == 1 and "norm" in name:
            t.normal_(1.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[name] = t.to(dtype)
    ours.load_state_dict(state, strict=True, assign=True)

    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(num_layers=blocks)
    # Its RoPE tables are plain tensor attributes, not parameters: rebuild them for real.
    ref.pos_embed = type(ref.pos_embed)(theta=10000, axes_dim=list(params.axes_dims_rope), scale_rope=True)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ref_state = ref.state_dict()
    shared = all(t.data_ptr() == ref_state[k].data_ptr() for k, t in ours.state_dict().items())
    assert shared, "the two models must share their weights"
    return ours.eval(), ref.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--text", type=int, default=64, help="text tokens")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    grid = args.size // 16
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours, ref = build_models(args.blocks, dtype)
        gen = torch.Generator().manual_seed(1)
        latents = torch.randn(1, grid * grid, 64, generator=gen).to(dtype)
        text = torch.randn(1, args.text, 3584, generator=gen).to(dtype)
        sigma = torch.tensor([0.6])

        def run_ours():
            return ours(latents, sigma, text, None, grid, grid)

        def run_ref():
            return ref(hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                       timestep=sigma, img_shapes=[(1, grid, grid)], return_dict=False)[0]

        times = {"ours": [], "diffusers": []}
        cpu = {"ours": [], "diffusers": []}  # process CPU time: less sensitive to other load
        with torch.inference_mode():
            a, b = run_ours(), run_ref()  # warm-up (and RoPE caches)
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for i in range(args.repeats):
                # interleave, alternating who goes first, so load from others hits both alike
                order = [("ours", run_ours), ("diffusers", run_ref)]
                for name, fn in (order if i % 2 == 0 else order[::-1]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        cpu_ratio = statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"])
        rows.append((dtype_name, o, d, o / d, min(times["ours"]) / min(times["diffusers"]), cpu_ratio, err))
        del ours, ref

    print(f"DiT forward, {args.blocks} blocks, inner 3072, {grid}x{grid} image + {args.text} text tokens, "
          f"{args.threads} threads, median of {args.repeats}")
    print("ratio = ours/diffusers of the median wall time; min_ratio of the fastest runs; "
          "cpu_ratio of the median process CPU time; max_rel_diff = max|ours - diffusers| / max|diffusers|")
    print(f"{'dtype':<10} {'ours_s':>8} {'diffusers_s':>12} {'ratio':>7} {'min_ratio':>10} {'cpu_ratio':>10} "
          f"{'max_rel_diff':>13}")
    for dtype_name, o, d, r, rmin, rcpu, err in rows:
        print(f"{dtype_name:<10} {o:8.3f} {d:12.3f} {r:7.3f} {rmin:10.3f} {rcpu:10.3f} {err:13.2e}")


if __name__ == "__main__":
    main()
