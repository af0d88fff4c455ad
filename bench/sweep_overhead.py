"""What a sweep costs beyond inference, and how long a LoRA alpha switch takes.

    python bench/sweep_overhead.py                 # tiny and mid-size models, sweeps of 4 and 16 jobs
    python bench/sweep_overhead.py --models tiny --jobs 3,9

For each model (random weights in the hub layout, built once under --work):
  1. baseline: the plain library, loaded once, N calls `pipe(prompt, seed=i, ...)`, timed;
  2. `python -m runner -m seed=0..N-1` with tracking=none and with the default SQLite MLflow
     store, for two sweep sizes N. Per sweep, everything the command took that is neither an
     image (each job's encode + denoise + decode, jobs.csv) nor the weights' load: Python's
     start-up and imports, Hydra, the check of every job before the first, each job's PNG,
     job.json and record, what the MLflow writer could not hide behind the images, the end's
     grid, report.html, jobs.csv and parent run. The two sizes split it into
     - per job: the slope, what each more job adds (a writer falling behind included);
     - per command: the intercept, paid once (start-up, the end's fixed part);
     and, for reference, `steady`: the time between launching a job and the next, minus its
     images, the first job left out; `start`: the process's start to the first job's launch;
  3. LoRA: a sweep over lora.alpha (a tiny peft-format LoRA, tracking=none): the `lora_s` of
     jobs 1.. is the time to switch alpha (the LoRA handle's set_alpha).
The goal: <= 30 ms per job beyond inference, with tracking on.
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

    from pipelines.demo import qwen_image_tiny as tiny
    from pipelines.demo.checkpoints import random_state_dict, save_sharded, write_json
    from pipelines.models.qwen_image_dit import QwenImageDiT, QwenImageDiTParams

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
    # everything the command took that is neither an image nor the weights' load: start-up, the
    # check of every job, the runner's work per job, what MLflow could not hide, the sweep's end
    total = wall - sum(inference) - float(rows[0]["load_s"] or 0)
    started = launches[0] - (end - wall) if end is not None and 0 in launches else None
    return {"wall_s": wall, "jobs": len(rows), "overhead_s": overheads, "total_overhead_s": total,
            "start_s": started, "inference_s": inference, "lora_s": lora, "load_s": float(rows[0]["load_s"])}


def split_costs(small: dict, large: dict) -> tuple[float, float]:
    """(per job, per command) from the total overheads of two sweep sizes."""
    n1, n2 = small["jobs"], large["jobs"]
    t1, t2 = small["total_overhead_s"], large["total_overhead_s"]
    per_job = (t2 - t1) / (n2 - n1)
    return per_job, t1 - per_job * n1


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
    parser.add_argument("--jobs", default="4,16", help="the two sweep sizes")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "runner-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (dtype as the runner's auto)")
    parser.add_argument("--modes", default="none,mlflow,lora", help="which sweeps to run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the images (OMP_NUM_THREADS); fewer than the cores leaves the "
                             "MLflow writer a core of its own, as a GPU machine does")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the sweeps' subprocesses inherit it
        import torch

        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    sizes = sorted(int(n) for n in args.jobs.split(","))
    models_dir = args.work / "models"
    args.work.mkdir(parents=True, exist_ok=True)
    build_models(models_dir, names)
    from pipelines.qwen_image import QwenImagePipeline

    has_lora = hasattr(QwenImagePipeline, "load_lora")
    results = {}
    for name in names:
        dev = f"device={args.device}"
        r = {"device": args.device, "baseline_s": baseline(models_dir, name, sizes[-1], args.device)}
        modes = args.modes.split(",")
        for mode, extra in (("none", ["tracking=none"]), ("mlflow", [])):
            if mode in modes:
                r[mode] = [sweep(models_dir, args.work, name, [seeds(n), dev, *extra], f"{mode}{n}") for n in sizes]
        if has_lora and "lora" in modes:
            lora = tiny_lora(models_dir, name, args.work / f"{name}-lora.safetensors")
            n = sizes[-1]
            alphas = "lora.alpha=" + ",".join(f"{a / n:g}" for a in range(1, n + 1))
            r["lora"] = [sweep(models_dir, args.work, name,
                               ["lora=file", f"lora.path={lora}", alphas, dev, "tracking=none"], "lora")]
        results[name] = r
    print_table(results, sizes)
    out = args.out or args.work / "sweep_overhead.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw figures: {out}")


def seeds(n: int) -> str:
    return "seed=" + ",".join(str(s) for s in range(n))


def print_table(results: dict, sizes: list[int]) -> None:
    print(f"\n{results[next(iter(results))]['device']}, {os.cpu_count()} CPU cores; sweeps of {sizes[0]} and "
          f"{sizes[-1]} jobs; beyond the jobs' own inference and the weights' load")
    print(f"{'model':6} {'mode':7} {'inference/job':>14} {'per job':>9} {'per command':>12} {'steady/job':>11} "
          f"{'start':>7} {'alpha switch':>13}")
    for name, r in results.items():
        print(f"{name:6} {'library':7} {statistics.median(r['baseline_s']):13.3f}s")
        for mode in ("none", "mlflow", "lora"):
            if mode not in r:
                continue
            runs = r[mode]
            big = runs[-1]
            inf = statistics.median(big["inference_s"][1:])
            steady = statistics.median(big["overhead_s"]) if big["overhead_s"] else float("nan")
            per_job, per_command = split_costs(*runs) if len(runs) == 2 else (float("nan"), float("nan"))
            switch = f"{statistics.median(big['lora_s'][1:]) * 1000:11.1f}ms" if mode == "lora" else "-"
            start = f"{big['start_s']:6.2f}s" if big.get("start_s") is not None else "-"
            print(f"{name:6} {mode:7} {inf:13.3f}s {per_job * 1000:7.1f}ms {per_command:11.2f}s {steady * 1000:9.1f}ms "
                  f"{start:>7} {switch:>13}")


if __name__ == "__main__":
    main()
