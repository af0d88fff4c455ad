"""Full-size Qwen-Image 2.1 DiT (7B, 32 blocks of 4096) on one GPU: seconds per step and peak VRAM, ours vs diffusers.

    python bench/qwen_image_21_gpu.py            # H100/H200: bf16, 1024x1024 with one reference picture
    python bench/qwen_image_21_gpu.py --tiny     # a 2-block toy on the CPU: checks the script end to end

A generation as both pipelines run it, without the text encoder and VAE: one reference picture (--picture pixels
square) and --text text tokens with the picture's vision slots, the target --size square, CFG (a second prompt of
--negative tokens, no picture slots beside the picture's), the KV cache on (both libraries' default): step 1 fills
the caches (`prefill`), the later steps read them (`cached`), one step = the two forwards. Random weights are made
once on the device and shared by both models (diffusers' built on meta and handed the same tensors). Prints a table
and, when $OUT is set, writes $OUT/qwen_image_21_gpu.json. Without diffusers: ours only.
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
from pipelines.core.loader import parameters_on_meta  # noqa: E402
from pipelines.models.qwen_image_21_dit import KVCache, QwenImage21DiT, QwenImage21DiTParams  # noqa: E402

TINY = QwenImage21DiTParams(num_layers=2, attention_head_dim=32, num_attention_heads=4, context_in_dim=64,
                            axes_dims_rope=(4, 14, 14))


def build_ours(params: QwenImage21DiTParams, device: torch.device, dtype: torch.dtype) -> QwenImage21DiT:
    with torch.device("meta"):
        model = QwenImage21DiT(params)
    gen = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, meta in model.state_dict().items():
        tensor = torch.empty(meta.shape, dtype=dtype, device=device)
        tensor.normal_(0.0, 0.02 if meta.ndim > 1 else 0.1, generator=gen)  # norms are zero-centred or near 1
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def build_diffusers_sharing(ours: QwenImage21DiT):
    try:
        from diffusers import QwenImage21Transformer2DModel
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"diffusers not importable ({type(exc).__name__}: {exc}); timing ours only")
        return None
    p = ours.params
    with parameters_on_meta():  # no init work; its buffers and RoPE tables are built for real
        ref = QwenImage21Transformer2DModel(
            patch_size=p.patch_size, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.num_layers,
            attention_head_dim=p.attention_head_dim, num_attention_heads=p.num_attention_heads,
            context_in_dim=p.context_in_dim, mlp_ratio=p.mlp_ratio, axes_dims_rope=tuple(p.axes_dims_rope))
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ref.kv_cache_class = QwenImage21KVCache
    return ref.to(ours.img_in.weight.device).eval()


def make_inputs(p: QwenImage21DiTParams, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    grid, ref = args.size // 16, args.picture // 16
    gen = torch.Generator(device=device).manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    slots = ref * ref // 4
    prompts = {}
    for name, tokens in (("cond", args.text), ("uncond", args.negative)):
        text_slots = torch.zeros(tokens + slots, dtype=torch.bool, device=device)
        text_slots[2: 2 + slots] = True  # "<image1><|vision_start|>" then the picture's slots
        prompts[name] = (randn(1, tokens + slots, p.context_in_dim), text_slots)
    return dict(grid=grid, ref=ref, latents=randn(1, grid * grid, p.in_channels),
                ref_latents=randn(1, ref * ref, p.in_channels), prompts=prompts)


def forward_fn(name: str, model, x: dict):
    """(prompt name, sigma, cache) -> the target's velocity."""
    grid, ref = x["grid"], x["ref"]
    if name == "ours":
        def forward(prompt, sigma, cache):
            text, slots = x["prompts"][prompt]
            return model(x["latents"], sigma, text, None, grid, grid, image_slots=slots, references=((ref, ref),),
                         reference_latents=x["ref_latents"], cache=cache)
        return forward

    def forward(prompt, sigma, cache):
        text, slots = x["prompts"][prompt]
        mask = torch.cat([slots, slots.new_ones(grid * grid // 4)])[None]
        out = model(hidden_states=torch.cat([x["ref_latents"], x["latents"]], 1), encoder_hidden_states=text,
                    timestep=sigma, img_shapes=[[(1, ref, ref), (1, grid, grid)]], img_mask=mask,
                    kv_cache=cache[0], kv_cache_mode=cache[1], return_dict=False)[0]
        return out[:, -grid * grid:]
    return forward


def new_caches(name: str, model) -> dict:
    if name == "ours":
        return {"cond": KVCache(), "uncond": KVCache()}
    return {"cond": model.kv_cache_class(len(model.transformer_blocks)),
            "uncond": model.kv_cache_class(len(model.transformer_blocks))}


def timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(name: str, model, x: dict, args: argparse.Namespace, device: torch.device, weights: int) -> tuple:
    forward = forward_fn(name, model, x)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rows = {"prefill": [], "cached": []}
    for _ in range(args.repeats + 1):  # the first generation warms up kernels and layouts
        caches = new_caches(name, model)
        for step in range(args.steps):
            sigma = torch.tensor([1.0 - step / args.steps], device=device)
            mode = "prefill" if step == 0 else "cached"
            how = {k: c if name == "ours" else (c, "extract" if step == 0 else "cached") for k, c in caches.items()}
            seconds, out = timed(device, lambda: (forward("cond", sigma, how["cond"]),
                                                  forward("uncond", sigma, how["uncond"])))
            rows[mode].append(seconds)
    result = dict(model=name, **{f"{k}_s": statistics.median(v[1 if k == "prefill" else args.steps - 1:])
                                 for k, v in rows.items()})
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        result["activations_gb"] = result["peak_gb"] - weights / 1e9
    return result, out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-block toy model (runs on the CPU)")
    parser.add_argument("--size", type=int, default=None, help="target side in pixels (multiple of 32)")
    parser.add_argument("--picture", type=int, default=None, help="reference picture side in pixels")
    parser.add_argument("--text", type=int, default=100, help="prompt tokens besides the picture's slots")
    parser.add_argument("--negative", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="steps per generation (1 prefill + cached ones)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations after the warm-up one")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps: at least 2 (the first fills the caches, the others read them)")
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny for the CPU check")
    args.size = args.size or (128 if args.tiny else 1024)
    args.picture = args.picture or args.size
    params, dtype = (TINY if args.tiny else QwenImage21DiTParams()), torch.bfloat16
    ours = build_ours(params, device, dtype)
    weights = sum(t.numel() * t.element_size() for t in ours.parameters())
    ref = None if args.no_diffusers else build_diffusers_sharing(ours)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
               params_b=sum(t.numel() for t in ours.parameters()) / 1e9, weights_gb=weights / 1e9,
               **{k: v for k, v in vars(args).items() if k != "no_diffusers"})
    print(json.dumps(env))
    results, outs = [], {}
    with torch.inference_mode():
        x = make_inputs(params, args, device, dtype)
        for name, model in [("ours", ours)] + ([("diffusers", ref)] if ref is not None else []):
            result, outs[name] = measure(name, model, x, args, device, weights)
            results.append(result)
            print(json.dumps(result))
    if len(outs) == 2:
        a, b = outs["ours"].float(), outs["diffusers"].float()
        results[-1]["max_rel_diff_vs_ours"] = ((a - b).abs().max() / b.abs().max()).item()
    print(f"\nQwen-Image 2.1 DiT, {env['device']}, bf16, {env['params_b']:.2f} B params; {args.size}^2 target, one "
          f"{args.picture}^2 picture, {args.text} + {args.negative} text tokens; one step = cond + uncond forward")
    base = results[-1] if len(results) == 2 else None
    for r in results:
        ratio = " ".join(f"{k} {r[k] / base[k]:.3f}" for k in ("prefill_s", "cached_s")) if base else ""
        peak = f"peak {r['peak_gb']:.2f} GB (activations {r['activations_gb']:.2f})" if "peak_gb" in r else ""
        print(f"{r['model']:<10} prefill step {r['prefill_s']:.3f} s, cached step {r['cached_s']:.3f} s {peak} "
              f"{'ratio ' + ratio if ratio else ''}")
    if "max_rel_diff_vs_ours" in results[-1]:
        print(f"max|ours - diffusers| / max|diffusers| of the last step's velocity: "
              f"{results[-1]['max_rel_diff_vs_ours']:.2e}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "qwen_image_21_gpu.json"
        path.write_text(json.dumps(dict(env=env, results=results), indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
