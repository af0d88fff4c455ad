"""Full-size Qwen-Image DiT on one GPU: seconds per CFG step and peak VRAM, ours vs diffusers.

    python bench/gpu_dit.py                 # H100/H200: 60 blocks, bf16, 1328x1328 and 1024x1024
    python bench/gpu_dit.py --tiny          # a 2-block toy on the CPU: checks the script end to end

One CFG step = two forwards (cond with --cond-tokens text tokens, uncond with --uncond-tokens).
Random weights (20.4 B parameters, 41 GB in bf16) are created once, directly on the device,
and shared by both models: ours is built on the meta device and materialised tensor by tensor;
diffusers' model is built on meta and handed the same tensors (load_state_dict(assign=True)).
Prints a table and, when $OUT is set, writes $OUT/gpu_dit.json. Without diffusers: ours only.
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
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams  # noqa: E402

TINY = QwenImageDiTParams(num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                          axes_dims_rope=(4, 14, 14))


def build_ours(params: QwenImageDiTParams, device: torch.device, dtype: torch.dtype, seed: int = 0) -> QwenImageDiT:
    """Random weights made on the device, one tensor at a time (no CPU copy, no init work)."""
    with torch.device("meta"):
        model = QwenImageDiT(params)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        t = torch.empty(meta.shape, dtype=dtype, device=device)
        if meta.ndim == 1 and "norm" in name:
            t.normal_(1.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def build_diffusers_sharing(ours: QwenImageDiT):
    """diffusers' QwenImageTransformer2DModel holding ours' tensors; None when not installed."""
    try:
        from diffusers import QwenImageTransformer2DModel
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"diffusers not importable ({type(exc).__name__}: {exc}); timing ours only")
        return None
    p = ours.params
    config = dict(patch_size=p.patch_size, in_channels=p.in_channels, out_channels=p.out_channels,
                  num_layers=p.num_layers, attention_head_dim=p.attention_head_dim,
                  num_attention_heads=p.num_attention_heads, joint_attention_dim=p.joint_attention_dim,
                  axes_dims_rope=tuple(p.axes_dims_rope))
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(**config)
    # Its RoPE tables are plain tensor attributes (not parameters): rebuild them for real.
    ref.pos_embed = type(ref.pos_embed)(theta=10000, axes_dim=list(p.axes_dims_rope), scale_rope=True)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ref_state = ref.state_dict()
    assert all(t.data_ptr() == ref_state[k].data_ptr() for k, t in ours.state_dict().items()), "weights not shared"
    return ref.eval()


class Timer:
    """Wall time of a region: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


def make_inputs(params: QwenImageDiTParams, size: int, cond_tokens: int, uncond_tokens: int,
                device: torch.device, dtype: torch.dtype) -> dict:
    if size % 16:
        raise SystemExit(f"--sizes: {size} is not a multiple of 16")
    grid = size // 16
    gen = torch.Generator(device=device).manual_seed(size)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    return dict(grid=grid, latents=randn(1, grid * grid, params.in_channels),
                cond=randn(1, cond_tokens, params.joint_attention_dim),
                uncond=randn(1, uncond_tokens, params.joint_attention_dim),
                sigma=torch.tensor([0.7], device=device))


def cfg_step_fn(name: str, model, x: dict):
    """A callable doing one CFG step (cond + uncond forwards) and returning the combined output."""
    grid, latents, sigma = x["grid"], x["latents"], x["sigma"]
    if name == "ours":
        def forward(text):
            return model(latents, sigma, text, None, grid, grid)
    else:
        def forward(text):
            return model(hidden_states=latents, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                         timestep=sigma, img_shapes=[(1, grid, grid)], return_dict=False)[0]

    def step():
        cond, uncond = forward(x["cond"]), forward(x["uncond"])
        return uncond + 4.0 * (cond - uncond)
    return step


def measure(name: str, model, x: dict, steps: int, device: torch.device, weights_bytes: int) -> dict:
    step = cfg_step_fn(name, model, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with Timer(device) as warm:
        out = step()  # warm-up: kernels, autotuning, RoPE caches
    times = []
    for _ in range(steps):
        with Timer(device) as t:
            step()
        times.append(t.seconds)
    result = dict(model=name, size=x["grid"] * 16, image_tokens=x["grid"] ** 2, warmup_s=warm.seconds,
                  step_s_median=statistics.median(times), step_s_min=min(times), steps=times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_gb=peak / 1e9, peak_activations_gb=(peak - weights_bytes) / 1e9)
    return result, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-block toy model (runs on the CPU)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in pixels")
    parser.add_argument("--steps", type=int, default=3, help="timed CFG steps per model and size")
    parser.add_argument("--cond-tokens", type=int, default=100)
    parser.add_argument("--uncond-tokens", type=int, default=10)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    args = parser.parse_args()

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny for the CPU check")
    sizes = args.sizes or ([256, 128] if args.tiny else [1328, 1024])
    params = TINY if args.tiny else QwenImageDiTParams()
    dtype = torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ours = build_ours(params, device, dtype)
    weights_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    ref = None if args.no_diffusers else build_diffusers_sharing(ours)
    build_s = time.perf_counter() - t0
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, dtype=str(dtype), params=sum(p.numel() for p in ours.parameters()),
               weights_gb=weights_bytes / 1e9, build_s=build_s, tiny=args.tiny,
               cond_tokens=args.cond_tokens, uncond_tokens=args.uncond_tokens)
    if ref is not None:
        import diffusers
        env["diffusers"] = diffusers.__version__
    print(json.dumps(env))

    models = [("ours", ours)] + ([("diffusers", ref)] if ref is not None else [])
    results = []
    with torch.inference_mode():
        for size in sizes:
            x = make_inputs(params, size, args.cond_tokens, args.uncond_tokens, device, dtype)
            outs = {}
            for name, model in models:
                result, outs[name] = measure(name, model, x, args.steps, device, weights_bytes)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
            if len(outs) == 2:
                a, b = outs["ours"].float(), outs["diffusers"].float()
                results[-1]["max_rel_diff_vs_ours"] = ((a - b).abs().max() / b.abs().max()).item()
            del x, outs

    print(f"\nQwen-Image DiT, {env['device']}, bf16, {env['params'] / 1e9:.2f} B params, one CFG step = "
          f"forward with {args.cond_tokens} + forward with {args.uncond_tokens} text tokens; median of {args.steps}")
    print(f"{'size':>6} {'model':<10} {'step_s':>8} {'min_s':>8} {'peak_GB':>8} {'act_GB':>7} {'ratio':>6}")
    for size in sizes:
        rows = [r for r in results if r["size"] == size]
        base = next((r["step_s_median"] for r in rows if r["model"] == "diffusers"), None)
        for r in rows:
            ratio = f"{r['step_s_median'] / base:6.3f}" if base else "     -"
            peak = f"{r['peak_gb']:8.2f} {r['peak_activations_gb']:7.2f}" if "peak_gb" in r else f"{'-':>8} {'-':>7}"
            print(f"{size:>6} {r['model']:<10} {r['step_s_median']:8.3f} {r['step_s_min']:8.3f} {peak} {ratio}")
        diff = [r["max_rel_diff_vs_ours"] for r in rows if "max_rel_diff_vs_ours" in r]
        if diff:
            print(f"{'':>6} max|ours - diffusers| / max|diffusers| of the CFG output: {diff[0]:.2e}")

    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "gpu_dit.json"
        path.write_text(json.dumps(dict(env=env, results=results), indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
