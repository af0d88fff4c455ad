"""One ControlNet denoising step on this CPU: ours vs diffusers, the SAME weights (shared tensors).

A step as both pipelines run it with CFG: the InstantX ControlNet once (with the prompt), then the
DiT twice (prompt, negative prompt), each adding the net's block samples (diffusers' interval rule).
Full width (inner 3072 = 24 heads x 128, joint dim 3584) with few blocks (--dit-blocks, --net-blocks),
a 256x256 image (16x16 = 256 image tokens) and 32 text tokens; 2 threads. Ours runs the pipeline's
own code path (qwen_image_control.Controls and the DiT's block_residual hook); diffusers runs
QwenImageControlNetModel and QwenImageTransformer2DModel(controlnet_block_samples=...).

    python bench/controlnet_cpu.py [--dit-blocks 2] [--net-blocks 1] [--repeats 3] [--dtypes float32]

Prints seconds per step (median of interleaved runs) and ours/diffusers (target <= 1.05).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.core.control import ControlNetInput  # noqa: E402
from pipelines.models.qwen_image_controlnet import QwenImageControlNet, QwenImageControlNetParams  # noqa: E402
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams  # noqa: E402
from pipelines.qwen_image_control import Controls  # noqa: E402


def random_state(model: torch.nn.Module, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=torch.float32)
        t.normal_(1.0, 0.1, generator=gen) if p.ndim == 1 and "norm" in name else t.normal_(0.0, 0.02, generator=gen)
        state[name] = t.to(dtype)
    return state


def build(cls, params, reference_cls, reference_config: dict, dtype: torch.dtype, seed: int):
    """Ours with random weights; diffusers' model built on meta and handed the same tensors."""
    with torch.device("meta"):
        ours = cls(params)
    ours.load_state_dict(random_state(ours, dtype, seed), strict=True, assign=True)
    with torch.device("meta"):
        reference = reference_cls(**reference_config)
    # its RoPE tables are plain tensor attributes, not parameters: rebuild them for real
    reference.pos_embed = type(reference.pos_embed)(theta=10000, axes_dim=list(params.axes_dims_rope),
                                                    scale_rope=True)
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    reference_state = reference.state_dict()
    assert all(t.data_ptr() == reference_state[k].data_ptr() for k, t in ours.state_dict().items()), "not shared"
    return ours.eval(), reference.eval()


def models(dit_blocks: int, net_blocks: int, dtype: torch.dtype):
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    dit, ref_dit = build(QwenImageDiT, QwenImageDiTParams(num_layers=dit_blocks), QwenImageTransformer2DModel,
                         dict(num_layers=dit_blocks), dtype, seed=0)
    net, ref_net = build(QwenImageControlNet, QwenImageControlNetParams(num_layers=net_blocks),
                         QwenImageControlNetModel, dict(num_layers=net_blocks), dtype, seed=1)
    return dit, net, ref_dit, ref_net


def step_functions(dit, net, ref_dit, ref_net, grid: int, text_len: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, grid * grid, 64, generator=gen).to(dtype)
    condition = torch.randn(1, grid * grid, 64, generator=gen).to(dtype)
    text = torch.randn(1, text_len, 3584, generator=gen).to(dtype)
    negative = torch.randn(1, text_len // 2, 3584, generator=gen).to(dtype)
    sigma = torch.tensor([0.6])
    shapes = [(1, grid, grid)]

    def ours():
        controls = Controls([net], [ControlNetInput(scale=0.8)], [condition], len(dit.transformer_blocks), 1,
                            (text, None))
        controls.set_step(0)
        hook = controls.hook(latents, sigma, grid, grid)
        return [dit(latents, sigma, t, None, grid, grid, block_residual=hook) for t in (text, negative)]

    def reference():
        samples = ref_net(hidden_states=latents, controlnet_cond=condition, conditioning_scale=0.8,
                          encoder_hidden_states=text, encoder_hidden_states_mask=None, timestep=sigma,
                          img_shapes=shapes, return_dict=False)
        return [ref_dit(hidden_states=latents, encoder_hidden_states=t, encoder_hidden_states_mask=None,
                        timestep=sigma, img_shapes=shapes, controlnet_block_samples=samples, return_dict=False)[0]
                for t in (text, negative)]

    return ours, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit-blocks", type=int, default=2)
    parser.add_argument("--net-blocks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--text", type=int, default=32, help="text tokens of the prompt (the negative: half)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = args.size // 16
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours, reference = step_functions(*models(args.dit_blocks, args.net_blocks, dtype), grid, args.text, dtype)
        times = {"ours": [], "diffusers": []}
        cpu = {"ours": [], "diffusers": []}  # process CPU time: less sensitive to other load
        with torch.inference_mode():
            a, b = ours(), reference()  # warm-up (and RoPE caches)
            err = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item() for x, y in zip(a, b))
            for i in range(args.repeats):
                order = [("ours", ours), ("diffusers", reference)]  # interleaved, alternating who goes first
                for name, fn in (order if i % 2 == 0 else order[::-1]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
        rows.append((dtype_name, o, d, o / d, statistics.median(cpu["ours"]) / statistics.median(cpu["diffusers"]),
                     err))
    print(f"ControlNet step (net once + DiT twice), DiT {args.dit_blocks} blocks, net {args.net_blocks}, inner 3072, "
          f"{grid}x{grid} image + {args.text}/{args.text // 2} text tokens, {args.threads} threads, median of "
          f"{args.repeats}")
    print("ratio = ours/diffusers of the median wall time; cpu_ratio of the median process CPU time; "
          "max_rel_diff = max|ours - diffusers| / max|diffusers| over both outputs")
    print(f"{'dtype':<10} {'ours_s':>8} {'diffusers_s':>12} {'ratio':>7} {'cpu_ratio':>10} {'max_rel_diff':>13}")
    for dtype_name, o, d, r, rcpu, err in rows:
        print(f"{dtype_name:<10} {o:8.3f} {d:12.3f} {r:7.3f} {rcpu:10.3f} {err:13.2e}")


if __name__ == "__main__":
    main()
