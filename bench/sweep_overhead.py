"""What a sweep costs beyond inference, and how long a LoRA alpha switch takes.

    python bench/sweep_overhead.py                 # tiny and mid-size models, 12 jobs each
    python bench/sweep_overhead.py --models tiny --jobs 6

For each model (random weights in the hub layout, built once under --work):
  1. baseline: the plain library, loaded once, 12 calls `pipe(prompt, seed=i, ...)`, timed;
  2. `python -m runner -m seed=0..11` with tracking=none and with the default SQLite MLflow
     store. Two figures per job, the first job (it loads the weights) left out:
     - steady: the wall time between Hydra launching a job and launching the next one, minus
       that job's own encode + denoise + decode time (jobs.csv): Hydra's per-job work, the
       LoRA check, the PNG and job.json, handing the record to the MLflow writer thread;
     - amortised: from launching job 1 to the end of the sweep (every MLflow write done, the
       grid, report.html and jobs.csv written), minus the inference of jobs 1.., per job: what
       the background writer could not hide behind inference shows here;
  3. LoRA: a sweep over lora.alpha (a tiny peft-format LoRA, tracking=none): the `lora_s` of
     jobs 1.. is the time to switch alpha (the LoRA handle's set_alpha).
The goal: overhead per job <= 5% of the inference time + a few tens of milliseconds.
Prints a table and writes --out (JSON). Times depend on this machine's load: compare the
ratios, rerun when the CPU is shared.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {
    # name: (model_id under the models folder, size in px, steps)
    "tiny": ("bench/Qwen-Image-Tiny", 128, 4),
    "mid": ("bench/Qwen-Image-Mid", 256, 4),
}
PROMPT = "a lighthouse on a cliff at sunset"


def build_models(models_dir: Path, names: list[str]) -> None:
    """The tiny repo from the library's builder; the mid-size one is the tiny repo with a
    bigger transformer (~40M parameters: 6 layers of width 512), same text encoder and VAE."""
    import shutil

    from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams
    from pipelines.testing import tiny
    from pipelines.testing.checkpoints import random_state_dict, save_sharded, write_json

    tiny_dir = models_dir / MODELS["tiny"][0]
    if not tiny_dir.exists():
        print(f"building tiny into {tiny_dir}", flush=True)
        tiny.build_tiny_repo(tiny_dir)
    mid_dir = models_dir / MODELS["mid"][0]
    if "mid" in names and not mid_dir.exists():
        print(f"building mid into {mid_dir}", flush=True)
        params = QwenImageDiTParams(num_layers=6, attention_head_dim=64, num_attention_heads=8,
                                    joint_attention_dim=tiny.TEXT_HIDDEN, axes_dims_rope=(8, 28, 28))
        staging = mid_dir.with_name(mid_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(tiny_dir, staging, ignore=shutil.ignore_patterns("transformer"))
        shapes = tiny._shapes(lambda: QwenImageDiT(params))
        save_sharded(random_state_dict(shapes, 0), staging / "transformer", "diffusion_pytorch_model", 2)
        write_json(staging / "transformer" / "config.json", tiny.dit_config(params))
        staging.rename(mid_dir)


def model_overrides(name: str) -> list[str]:
    model_id, size, steps = MODELS[name]
    files = [f"model.files.{i}.model_id={model_id}" for i in range(3)]
    return ["model=qwen_image_tiny", "model.build=null", f"model.name={name}", *files,
            f"model.tokenizer.model_id={model_id}", f"sampler.height={size}", f"sampler.width={size}",
            f"sampler.steps={steps}", "sampler.cfg_scale=4.0", f"prompt={PROMPT}", "progress_bar=false"]


def baseline(models_dir: Path, name: str, jobs: int, device: str) -> list[float]:
    """Plain library calls, in this process: load once, warm up, time `jobs` images."""
    import torch

    from pipelines.qwen_image import ModelConfig, QwenImagePipeline

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # the runner's dtype=auto

    model_id, size, steps = MODELS[name]
    os.environ["DIFFSYNTH_MODEL_BASE_PATH"] = str(models_dir)
    patterns = ["transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
                "vae/diffusion_pytorch_model.safetensors"]
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=dtype, device=device,
        model_configs=[ModelConfig(model_id=model_id, origin_file_pattern=p, skip_download=True) for p in patterns],
        tokenizer_config=ModelConfig(model_id=model_id, origin_file_pattern="tokenizer/", skip_download=True))
    kw = dict(height=size, width=size, num_inference_steps=steps, cfg_scale=4.0, progress_bar=False)
    pipe(PROMPT, seed=0, **kw)
    times = []
    for seed in range(jobs):
        t = time.perf_counter()
        pipe(PROMPT, seed=seed, **kw)
        times.append(time.perf_counter() - t)
    del pipe
    return times


# "[time][runner][INFO] - job 3 (4/12, ETA 0:00:05): seed=3": the runner launching a job
_LAUNCH = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]+\](?:\[\w+\] -)? job (\d+) \(\d+/\d+")
_END = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]+\](?:\[\w+\] -)? Sweep (FINISHED|FAILED|KILLED)")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def sweep(models_dir: Path, work: Path, name: str, extra: list[str], label: str) -> dict:
    """Run one multirun in a subprocess; per-job overhead from Hydra's launch times, the end of
    the sweep and the jobs' own inference times (jobs.csv)."""
    import shutil

    sweep_dir = work / f"{name}-{label}"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # the runner never writes into a used folder
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, DIFFSYNTH_MODEL_BASE_PATH=str(models_dir), PYTHONPATH=path)
    argv = [sys.executable, "-m", "runner", "-m", *model_overrides(name), *extra,
            f"tracking.store_dir={work / 'store'}", f"experiment=bench-{name}-{label}",
            f"hydra.sweep.dir={sweep_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    launches, end = {}, None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := _LAUNCH.match(line):
            launches[int(m.group(2))] = _stamp(m.group(1))
        elif m := _END.match(line):
            end = _stamp(m.group(1))
    rows = list(csv.DictReader(open(sweep_dir / "jobs.csv")))
    overheads, inference, lora = [], [], []
    for row in rows:
        i = int(row["job"])
        infer = sum(float(row[k]) for k in ("encode_s", "denoise_s", "decode_s"))
        inference.append(infer)
        lora.append(float(row["lora_s"] or 0))
        if i >= 1 and i + 1 in launches:
            overheads.append(launches[i + 1] - launches[i] - infer)
    amortised = None
    if end is not None and 1 in launches and len(rows) > 1:
        amortised = (end - launches[1] - sum(inference[1:])) / (len(rows) - 1)
    return {"wall_s": wall, "jobs": len(rows), "overhead_s": overheads, "amortised_s": amortised,
            "inference_s": inference, "lora_s": lora, "load_s": float(rows[0]["load_s"])}


def tiny_lora(models_dir: Path, name: str, out: Path, rank: int = 4) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for shard in sorted((models_dir / MODELS[name][0] / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if ".attn.to_" in key and key.endswith(".weight"):
                    o, i = f.get_slice(key).get_shape()
                    base = "transformer." + key[: -len(".weight")]
                    tensors[f"{base}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.1
                    tensors[f"{base}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.1
    save_file(tensors, str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "runner-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (dtype as the runner's auto)")
    parser.add_argument("--modes", default="none,mlflow,lora", help="which sweeps to run")
    args = parser.parse_args()
    names = args.models.split(",")
    models_dir = args.work / "models"
    args.work.mkdir(parents=True, exist_ok=True)
    build_models(models_dir, names)
    from pipelines.qwen_image import QwenImagePipeline

    has_lora = hasattr(QwenImagePipeline, "load_lora")
    seeds = "seed=" + ",".join(str(s) for s in range(args.jobs))
    results = {}
    for name in names:
        dev = f"device={args.device}"
        r = {"device": args.device, "baseline_s": baseline(models_dir, name, args.jobs, args.device)}
        modes = args.modes.split(",")
        if "none" in modes:
            r["none"] = sweep(models_dir, args.work, name, [seeds, dev, "tracking=none"], "none")
        if "mlflow" in modes:
            r["mlflow"] = sweep(models_dir, args.work, name, [seeds, dev], "mlflow")
        if has_lora and "lora" in modes:
            lora = tiny_lora(models_dir, name, args.work / f"{name}-lora.safetensors")
            alphas = "lora.alpha=" + ",".join(f"{a / args.jobs:g}" for a in range(1, args.jobs + 1))
            r["lora"] = sweep(models_dir, args.work, name,
                              ["lora=file", f"lora.path={lora}", alphas, dev, "tracking=none"], "lora")
        results[name] = r

    print(f"\ndevice {args.device}, {os.cpu_count()} CPU cores")
    print(f"{'model':6} {'mode':7} {'inference/job':>14} {'overhead/job (median)':>22} {'overhead %':>11} "
          f"{'amortised/job':>14} {'alpha switch':>13}")
    for name, r in results.items():
        base = statistics.median(r["baseline_s"])
        print(f"{name:6} {'library':7} {base:13.3f}s {'-':>22} {'-':>11} {'-':>14} {'-':>13}")
        for mode in ("none", "mlflow", "lora"):
            if mode not in r:
                continue
            s = r[mode]
            inf = statistics.median(s["inference_s"][1:])
            ov = statistics.median(s["overhead_s"]) if s["overhead_s"] else float("nan")
            switch = f"{statistics.median(s['lora_s'][1:]) * 1000:10.1f}ms" if mode == "lora" else "-"
            am = f"{s['amortised_s'] * 1000:12.1f}ms" if s.get("amortised_s") is not None else "-"
            print(f"{name:6} {mode:7} {inf:13.3f}s {ov * 1000:20.1f}ms {100 * ov / inf:10.1f}% {am:>14} {switch:>13}")
    out = args.out or args.work / "sweep_overhead.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw figures: {out}")


if __name__ == "__main__":
    main()
