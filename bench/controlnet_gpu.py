"""Full-size Qwen-Image DiT + an InstantX ControlNet on one GPU: seconds per ControlNet CFG step and
peak VRAM, ours vs diffusers (the same weights, shared tensors).

    python bench/controlnet_gpu.py              # H100/H200: 60-block DiT + Union (5 blocks), bf16, 1328 and 1024
    python bench/controlnet_gpu.py --inpaint    # the Inpainting net (6 blocks, 68 condition channels)
    python bench/controlnet_gpu.py --tiny       # a toy on the CPU: checks the script end to end

One step = the ControlNet once (prompt, --cond-tokens text tokens) and the DiT twice (prompt, and the
negative prompt with --uncond-tokens), both adding the net's block samples: what both pipelines do per
step with CFG. Ours runs the pipeline's code path (qwen_image_control.Controls, the DiT's
block_residual hook); diffusers runs QwenImageControlNetModel and QwenImageTransformer2DModel with
controlnet_block_samples. Random weights (DiT 41 GB + net 3.4 GB in bf16) are made on the device once
and shared. Prints a table and, when $OUT is set, writes $OUT/controlnet_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_dit import TINY, Timer, build_diffusers_sharing, build_ours  # noqa: E402

from pipelines.core.control import ControlNetInput  # noqa: E402
from pipelines.models.qwen_image_controlnet import QwenImageControlNet, QwenImageControlNetParams  # noqa: E402
from pipelines.models.qwen_image_dit import QwenImageDiTParams  # noqa: E402
from pipelines.qwen_image_control import Controls  # noqa: E402


def net_params(dit: QwenImageDiTParams, inpaint: bool) -> QwenImageControlNetParams:
    return QwenImageControlNetParams(
        num_layers=6 if inpaint else 5, attention_head_dim=dit.attention_head_dim,
        num_attention_heads=dit.num_attention_heads, joint_attention_dim=dit.joint_attention_dim,
        axes_dims_rope=dit.axes_dims_rope, extra_condition_channels=4 if inpaint else 0)


def build_net(params: QwenImageControlNetParams, device: torch.device, dtype: torch.dtype) -> QwenImageControlNet:
    with torch.device("meta"):
        net = QwenImageControlNet(params)
    gen = torch.Generator(device=device).manual_seed(1)
    state = {}
    for name, meta in net.state_dict().items():
        t = torch.empty(meta.shape, dtype=dtype, device=device)
        t.normal_(1.0, 0.1, generator=gen) if meta.ndim == 1 and "norm" in name else t.normal_(0.0, 0.02, generator=gen)
        state[name] = t
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval()


def net_sharing(net: QwenImageControlNet):
    from diffusers import QwenImageControlNetModel

    p = net.params
    with torch.device("meta"):
        ref = QwenImageControlNetModel(num_layers=p.num_layers, attention_head_dim=p.attention_head_dim,
                                       num_attention_heads=p.num_attention_heads,
                                       joint_attention_dim=p.joint_attention_dim, axes_dims_rope=p.axes_dims_rope,
                                       extra_condition_channels=p.extra_condition_channels)
    ref.pos_embed = type(ref.pos_embed)(theta=10000, axes_dim=list(p.axes_dims_rope), scale_rope=True)
    ref.load_state_dict(net.state_dict(), strict=True, assign=True)
    ref_state = ref.state_dict()
    assert all(t.data_ptr() == ref_state[k].data_ptr() for k, t in net.state_dict().items()), "weights not shared"
    return ref.eval()


def step_functions(dit, net, ref_dit, ref_net, size: int, args, device: torch.device, dtype: torch.dtype):
    grid = size // 16
    gen = torch.Generator(device=device).manual_seed(size)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    latents = randn(1, grid * grid, dit.params.in_channels)
    condition = randn(1, grid * grid, net.params.condition_channels)
    cond, uncond = randn(1, args.cond_tokens, dit.params.joint_attention_dim), randn(
        1, args.uncond_tokens, dit.params.joint_attention_dim)
    sigma = torch.tensor([0.7], device=device)
    shapes = [(1, grid, grid)]

    def ours():
        controls = Controls([net], [ControlNetInput()], [condition], len(dit.transformer_blocks), 1, (cond, None))
        controls.set_step(0)
        hook = controls.hook(latents, sigma, grid, grid)
        c, u = (dit(latents, sigma, t, None, grid, grid, block_residual=hook) for t in (cond, uncond))
        return u + 4.0 * (c - u)

    def reference():
        samples = ref_net(hidden_states=latents, controlnet_cond=condition, conditioning_scale=1.0,
                          encoder_hidden_states=cond, encoder_hidden_states_mask=None, timestep=sigma,
                          img_shapes=shapes, return_dict=False)
        c, u = (ref_dit(hidden_states=latents, encoder_hidden_states=t, encoder_hidden_states_mask=None,
                        timestep=sigma, img_shapes=shapes, controlnet_block_samples=samples, return_dict=False)[0]
                for t in (cond, uncond))
        return u + 4.0 * (c - u)

    return {"ours": ours, "diffusers": reference}


def measure(name: str, step, size: int, steps: int, device: torch.device, weights_bytes: int):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with Timer(device) as warm:
        out = step()
    times = []
    for _ in range(steps):
        with Timer(device) as t:
            step()
        times.append(t.seconds)
    result = dict(model=name, size=size, warmup_s=warm.seconds, step_s_median=statistics.median(times),
                  step_s_min=min(times), steps=times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_gb=peak / 1e9, peak_activations_gb=(peak - weights_bytes) / 1e9)
    return result, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a toy model (runs on the CPU)")
    parser.add_argument("--inpaint", action="store_true", help="the Inpainting net instead of Union")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and size")
    parser.add_argument("--cond-tokens", type=int, default=100)
    parser.add_argument("--uncond-tokens", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    args = parser.parse_args()

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny for the CPU check")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([256, 128] if args.tiny else [1328, 1024])
    params, dtype = (TINY if args.tiny else QwenImageDiTParams()), torch.bfloat16
    t0 = time.perf_counter()
    dit, net = build_ours(params, device, dtype), build_net(net_params(params, args.inpaint), device, dtype)
    ref_dit, ref_net = build_diffusers_sharing(dit), net_sharing(net)
    weights_bytes = sum(p.numel() * p.element_size() for m in (dit, net) for p in m.parameters())
    import diffusers

    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
               diffusers=diffusers.__version__, dtype=str(dtype), net="Inpainting" if args.inpaint else "Union",
               net_blocks=net.params.num_layers, weights_gb=weights_bytes / 1e9, build_s=time.perf_counter() - t0,
               tiny=args.tiny, cond_tokens=args.cond_tokens, uncond_tokens=args.uncond_tokens)
    print(json.dumps(env))
    results = []
    with torch.inference_mode():
        for size in sizes:
            outs = {}
            for name, step in step_functions(dit, net, ref_dit, ref_net, size, args, device, dtype).items():
                result, outs[name] = measure(name, step, size, args.steps, device, weights_bytes)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
            a, b = outs["ours"].float(), outs["diffusers"].float()
            results[-1]["max_rel_diff_vs_ours"] = ((a - b).abs().max() / b.abs().max()).item()
    print(f"\nQwen-Image DiT + InstantX {env['net']} ControlNet, {env['device']}, bf16; median of {args.steps} steps")
    print(f"{'size':>6} {'model':<10} {'step_s':>8} {'min_s':>8} {'peak_GB':>8} {'ratio':>6}")
    for size in sizes:
        rows = [r for r in results if r["size"] == size]
        base = next(r["step_s_median"] for r in rows if r["model"] == "diffusers")
        for r in rows:
            peak = f"{r['peak_gb']:8.2f}" if "peak_gb" in r else f"{'-':>8}"
            print(f"{size:>6} {r['model']:<10} {r['step_s_median']:8.3f} {r['step_s_min']:8.3f} {peak} "
                  f"{r['step_s_median'] / base:6.3f}")
        print(f"{'':>6} max|ours - diffusers| / max|diffusers|: {rows[-1]['max_rel_diff_vs_ours']:.2e}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "controlnet_gpu.json"
        path.write_text(json.dumps(dict(env=env, results=results), indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
