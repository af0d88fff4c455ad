"""VRAM presets on one GPU: the full-size Qwen-Image pipeline (random weights) at 1328x1328.

    python bench/vram_gpu.py                  # H100/H200, about 4-6 minutes; prints a table
    python bench/vram_gpu.py --tiny           # the tiny model on the CPU: checks the script end to end

For each preset of conf/vram (none, cpu_offload, fp8, low_vram, disk) it loads the pipeline with
`QwenImagePipeline.from_pretrained` and the preset's ModelConfig keys, generates one image
(4 steps, true CFG 4.0) and reports the peak of allocated VRAM over the call, the seconds per
denoising step (median over the steps after the first; CUDA events at the end of each DiT
forward), the stage times, and how many GiB of layers stayed prepared on the GPU. low_vram and
disk run with `vram_limit` = budget - margin (default 8 - 3 GiB: DiffSynth-Studio's lowest
published rung) and tiled VAE decoding; they and `none` also run with `cfg_batch=True` (both CFG
branches in one forward: the weights stream once per step). Goals: each preset at or below its
rung of DiffSynth-Studio's published ladder (56 / 40 / 21 / 8 GB, read as GiB like its own
measurements), and low_vram and disk within 1.5x of the resident seconds per step.

Weights: random, written once into --workdir as safetensors in the hub's layout (matrices and
kernels in float8_e4m3fn, vectors in bfloat16: 27.6 GB on disk); the files are reused by later runs.
Every preset therefore computes with exactly the same weight values (float8 values are exact in
bfloat16), so the images of all presets should agree: the table shows each one's largest pixel
difference from `none` as a correctness check. The disk preset reads the files in place.

Prints one JSON line per run as it goes, then the table; writes $OUT/vram_gpu.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import zlib
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch allocates

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.core import vram  # noqa: E402
from pipelines.core.loader import parameters_on_meta  # noqa: E402
from pipelines.models.qwen2_5_text import QwenImageTextEncoder, QwenTextEncoderParams  # noqa: E402
from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams  # noqa: E402
from pipelines.models.qwen_image_vae import QwenImageVAE, QwenImageVAEParams  # noqa: E402
from pipelines.qwen_image import ModelConfig, QwenImagePipeline  # noqa: E402

GiB = 1 << 30
RUNGS_GIB = {"none": 56, "cpu_offload": 40, "fp8": 21, "low_vram": 8, "disk": 8}
ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
SHARD_BYTES = 4 * GiB
PROMPT = (
    "A cozy bookshop on a rainy evening in an old European town, warm yellow light spilling from tall windows "
    "onto wet cobblestones, a grey cat asleep on a stack of leather-bound books, a hand-painted sign above the "
    "door that reads 'Open Late', reflections of street lamps in puddles, a bicycle leaning against the wall "
    "with a basket full of flowers, people with umbrellas hurrying past, soft mist, cinematic composition, "
    "shallow depth of field, detailed textures of brick, wood and glass, 35mm photograph, high dynamic range"
)


# ----------------------------------------------------------------------------- random checkpoints


def state_shapes(build) -> dict[str, tuple[int, ...]]:
    with parameters_on_meta():
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Activations of order one: norm scales near 1, small biases, 1/sqrt(fan-in) weights."""
    t = torch.empty(shape, dtype=torch.bfloat16, device=device)
    if len(shape) == 1:
        if "norm" in name or name.endswith("gamma"):
            return t.normal_(1.0, 0.05, generator=gen)
        return t.normal_(0.0, 0.02, generator=gen)
    return t.normal_(0.0, 1.0 / math.sqrt(math.prod(shape[1:])), generator=gen)


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype_of, make) -> None:
    """Stream tensors into one safetensors file (one tensor in memory at a time)."""
    header, offset = {}, 0
    for name, shape in entries:
        dtype = dtype_of(name, shape)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            t = make(name, shape).to(dtype_of(name, shape)).contiguous().cpu()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)


def write_model(folder: Path, shapes: dict[str, tuple[int, ...]], file_dtype: torch.dtype, device: torch.device,
                seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)

    def dtype_of(name, shape):
        return file_dtype if len(shape) >= 2 else torch.bfloat16  # vectors stay bf16, as the library keeps them

    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype_of(name, shape)).element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    for i, entries in enumerate(shards):
        write_safetensors(folder / f"part-{i + 1:05d}.safetensors", entries, dtype_of,
                          lambda name, shape: random_tensor(name, shape, device, gen))


def write_repo(root: Path, tiny: bool, file_dtype: torch.dtype, device: torch.device) -> dict:
    """DiT, text encoder, VAE folders; reused when a previous run left the same ones."""
    from pipelines.demo import qwen_image_tiny as tiny_repo  # its config.json writers

    if tiny:
        dit, te, vae = tiny_repo.DIT, tiny_repo.TEXT_ENCODER, tiny_repo.VAE
    else:
        dit, te, vae = QwenImageDiTParams(), QwenTextEncoderParams(), QwenImageVAEParams()
    spec = dict(tiny=tiny, file_dtype=str(file_dtype), version=2)
    marker = root / "DONE.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"reusing the random checkpoints in {root}", flush=True)
        return spec
    t0 = time.perf_counter()
    marker.unlink(missing_ok=True)
    for i, (folder, build, dtype, config) in enumerate((
            ("transformer", lambda: QwenImageDiT(dit), file_dtype, tiny_repo.dit_config(dit)),
            ("text_encoder", lambda: QwenImageTextEncoder(te), file_dtype, tiny_repo.text_encoder_config(te)),
            ("vae", lambda: QwenImageVAE(vae), file_dtype, tiny_repo.vae_config(vae)))):
        for old in (root / folder).glob("*"):
            old.unlink()
        write_model(root / folder, state_shapes(build), dtype, device, seed=i)
        (root / folder / "config.json").write_text(json.dumps(config))
        print(f"wrote {folder} ({time.perf_counter() - t0:.1f} s)", flush=True)
    marker.write_text(json.dumps(spec))
    return spec


class StubTokenizer:
    """Word-level ids from a hash (the real tokenizer needs files the GPU machine lacks)."""

    def __call__(self, text: str, return_tensors: str | None = None):
        ids = [1000 + zlib.crc32(w.encode()) % 150000 for w in re.findall(r"\w+|[^\w\s]", text)]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


# ----------------------------------------------------------------------------- presets


def presets(args, device: torch.device) -> list[tuple[str, dict, object, bool, list[bool]]]:
    """(name, ModelConfig keys, vram_limit, tiled, cfg_batch values to run) as conf/vram/*.yaml with
    auto = the run's dtype (bf16) and device."""
    auto_dtype = "bfloat16" if device.type == "cuda" else "float32"
    auto = str(device)
    fp8 = "float8_e4m3fn"
    limit = max(args.budget_gib - args.margin_gib, 0.0)
    table = {
        "none": ({}, None, False, [False, True]),
        "cpu_offload": (dict(offload_dtype=auto_dtype, offload_device="cpu", onload_dtype=auto_dtype,
                             onload_device=auto, preparing_dtype=auto_dtype, preparing_device=auto,
                             computation_dtype=auto_dtype, computation_device=auto), None, False, [False]),
        "fp8": (dict(offload_dtype=fp8, offload_device="cpu", onload_dtype=fp8, onload_device=auto,
                     preparing_dtype=fp8, preparing_device=auto, computation_dtype=auto_dtype,
                     computation_device=auto), None, False, [False]),
        "low_vram": (dict(offload_dtype=fp8, offload_device="cpu", onload_dtype=fp8, onload_device="cpu",
                          preparing_dtype=fp8, preparing_device=auto, computation_dtype=auto_dtype,
                          computation_device=auto), limit, True, [False, True]),
        "disk": (dict(offload_dtype="disk", offload_device="disk", onload_dtype=fp8, onload_device="cpu",
                      preparing_dtype=fp8, preparing_device=auto, computation_dtype=auto_dtype,
                      computation_device=auto), limit, True, [False, True]),
    }
    chosen = args.presets or list(table)
    return [(name, *table[name]) for name in chosen]


# ----------------------------------------------------------------------------- measuring


class StepClock:
    """Marks the end of every DiT forward (CUDA events, or perf_counter on the CPU)."""

    def __init__(self, dit: torch.nn.Module, cuda: bool):
        self.cuda, self.marks = cuda, []
        dit.register_forward_hook(self._mark)

    def _mark(self, module, args, output) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self, forwards_per_step: int) -> list[float]:
        ends = self.marks[forwards_per_step - 1::forwards_per_step]
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(ends, ends[1:])]
        return [b - a for a, b in zip(ends, ends[1:])]


def peak_rss_gib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux
    except Exception:  # noqa: BLE001
        return float("nan")


def run_preset(name, keys, limit, tiled, batch_modes, root: Path, device: torch.device, args,
               warm_up: bool = False) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=dtype, device=device, vram_limit=limit,
        model_configs=[ModelConfig(path=root / folder, **keys) for folder in ("transformer", "text_encoder", "vae")])
    pipe.tokenizer = StubTokenizer()
    load_s = time.perf_counter() - t0
    clock = StepClock(pipe.dit, cuda)
    stats = {}
    if pipe.vram:  # what the DiT manager looks like at the end of each forward
        pipe.dit.register_forward_hook(lambda m, a, o: stats.update(pipe.vram["dit"].stats()))
    if warm_up:
        pipe(PROMPT, height=256, width=256, num_inference_steps=2, seed=0, progress_bar=False)
        pipe(PROMPT, height=256, width=256, num_inference_steps=2, seed=0, progress_bar=False, cfg_batch=True)
    rows = []
    for cfg_batch in batch_modes:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        clock.marks.clear()
        t1 = time.perf_counter()
        image = pipe(PROMPT, negative_prompt=" ", cfg_scale=4.0, height=args.size, width=args.size, seed=0,
                     num_inference_steps=args.steps, tiled=tiled, cfg_batch=cfg_batch, progress_bar=False)
        call_s = time.perf_counter() - t1
        steps = clock.step_seconds(1 if cfg_batch else 2)
        row = dict(preset=name, cfg_batch=cfg_batch, vram_limit_gib=limit, tiled=tiled, load_s=round(load_s, 2),
                   call_s=round(call_s, 2), step_s=round(statistics.median(steps), 4) if steps else None,
                   steps_s=[round(s, 4) for s in steps], **{k: round(v, 3) for k, v in pipe.timings.items()},
                   host_peak_rss_gib=round(peak_rss_gib(), 1))
        if cuda:
            row.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 2),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GiB, 2))
        if stats:
            row.update(dit_prepared_gib=round(stats["prepared_gib"], 2), dit_prefetch_hits=stats["prefetch_hits"],
                       dit_prefetch_misses=stats["prefetch_misses"], pinned_gib=round(stats["pinned_gib"], 1))
        row["image"] = np.asarray(image, dtype=np.int16)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "image"}), flush=True)
    del pipe, image
    return rows


def print_table(rows: list[dict], env: dict) -> None:
    base = next((r["step_s"] for r in rows if r["preset"] == "none" and not r.get("cfg_batch") and r.get("step_s")),
                None)
    print(f"\nQwen-Image pipeline, random weights, {env['device']}, {env['size']}x{env['size']}, "
          f"{env['steps']} steps, CFG 4.0; s/step = median after the first step; ratio vs none (two forwards)")
    head = (f"{'preset':<12} {'cfg_batch':>9} {'limit':>6} {'peak GiB':>9} {'rung':>5} {'ok':>3} {'s/step':>7} "
            f"{'ratio':>6} {'load s':>7} {'call s':>7} {'prep GiB':>8} {'px diff':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"{r['preset']:<12} {r.get('error') or r.get('skipped')}")
            continue
        peak = r.get("peak_alloc_gib")
        rung = RUNGS_GIB.get(r["preset"])
        ok = "" if peak is None else ("yes" if peak <= rung else "NO")
        ratio = f"{r['step_s'] / base:.2f}" if base and r.get("step_s") else "-"
        limit = "-" if r["vram_limit_gib"] is None else f"{r['vram_limit_gib']:g}"
        print(f"{r['preset']:<12} {str(r['cfg_batch']):>9} {limit:>6} {peak if peak is not None else '-':>9} "
              f"{rung:>5} {ok:>3} {r['step_s'] if r.get('step_s') else '-':>7} {ratio:>6} {r['load_s']:>7} "
              f"{r['call_s']:>7} {r.get('dit_prepared_gib', '-'):>8} {r.get('px_diff_vs_none', '-'):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the script)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "qwen_image_random")
    parser.add_argument("--size", type=int, default=None, help="image side (default 1328; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budget-gib", type=float, default=8.0, help="the rung low_vram and disk aim at")
    parser.add_argument("--margin-gib", type=float, default=3.0,
                        help="vram_limit = budget - margin (activations, prefetch window, temporaries)")
    parser.add_argument("--presets", nargs="+", choices=list(RUNGS_GIB), default=None)
    parser.add_argument("--time-budget", type=float, default=420.0, help="skip presets not started by then (s)")
    args = parser.parse_args()
    t_start = time.perf_counter()

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --tiny for the CPU check")
    args.size = args.size or (64 if args.tiny else 1328)
    file_dtype = torch.float8_e4m3fn
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
               size=args.size, steps=args.steps, budget_gib=args.budget_gib, margin_gib=args.margin_gib,
               file_dtype=str(file_dtype), prefetch_bytes=vram.DEFAULT_PREFETCH_BYTES)
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    write_repo(args.workdir, args.tiny, file_dtype, device)
    env["write_s"] = round(time.perf_counter() - t0, 1)

    rows: list[dict] = []
    reference = None
    warm = True  # the first pipeline of the process warms up kernels and libraries with a small call
    for name, keys, limit, tiled, batch_modes in presets(args, device):
        if time.perf_counter() - t_start > args.time_budget:
            rows.append(dict(preset=name, skipped=f"skipped: past the {args.time_budget:.0f} s time budget"))
            continue
        try:
            new = run_preset(name, keys, limit, tiled, batch_modes, args.workdir, device, args, warm)
            warm = False
        except Exception as error:  # noqa: BLE001 - report and go on with the next preset
            traceback.print_exc()
            rows.append(dict(preset=name, error=f"{type(error).__name__}: {error}"[:300]))
            new = []
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        for row in new:
            if reference is None and name == "none" and not row["cfg_batch"]:
                reference = row["image"]
            if reference is not None:
                row["px_diff_vs_none"] = int(np.abs(row["image"] - reference).max())
            del row["image"]
        rows.extend(new)
    env["total_s"] = round(time.perf_counter() - t_start, 1)
    print_table(rows, env)
    print(f"total {env['total_s']} s (writing the checkpoints {env['write_s']} s)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vram_gpu.json").write_text(json.dumps(dict(env=env, rows=rows), indent=2))


if __name__ == "__main__":
    main()
