"""What a sweep costs beyond inference, per job and per command, and how long a LoRA alpha switch takes.

    python bench/sweep_overhead.py                          # tiny and mid models, sweeps of 2 and 12 jobs, 3 times
    python bench/sweep_overhead.py --models tiny --repeat 5 --max-load 1.0
    python bench/sweep_overhead.py --floor                  # also MLflow's own cost per job, measured alone

For each model (random weights in the hub layout, built once under --work):
  1. library: the plain library, loaded once, 12 calls `pipe(prompt, seed=i, ...)`: the image's own time;
  2. `python -m runner -m seed=0..N-1` with tracking=none and with the default SQLite MLflow store,
     for two sweep sizes (2 and 12), --repeat times, interleaved. For each command, its overhead:
     the whole command's wall time less each job's images (encode + denoise + decode, from jobs.csv)
     and the weights' load. That is Python's start-up and imports, Hydra, the check of every job
     before the first, each job's PNG, job.json, log and record, what the MLflow writer could not
     do while the images were computed, the end's grid, report.html, jobs.csv and parent run.
     Two sizes split it into
     - per job: what each job adds; amortised over the 12-job sweep once the per-command part is
       taken out, (overhead(12) - per command) / 12, which is the slope between the two sizes;
     - per command: the intercept, paid once (start-up, the end's fixed part);
     and, of the 12-job sweep: `steady`, the time between launching a job and the next less its
     images (the first job left out); `start`, the process's start to the first job's launch;
     `end`, the last job's end to the process's end (grid, report.html, parent run, the writer's
     backlog); `CPU/job`, the CPU seconds (every process and thread of the command, images
     included) each job adds: tracking's CPU per job is the mlflow row's less the none row's.
     Work done beside the images (the MLflow writer process, the report's thumbnails) is not
     overhead by this measure when the CPU has room for it; on a machine whose cores the images
     fill, it slows the images instead: compare `inference/job` with the library's and `CPU/job`;
  3. LoRA: a sweep over lora.alpha (a tiny peft-format LoRA, tracking=none): the `lora_s` of
     jobs 1.. is the time to switch alpha (the LoRA handle's set_alpha);
  4. --floor: MLflow alone in this process, per job as the writer logs it on a new SQLite store:
     create_run (the start's tags), log_batch (params, metrics, the end's tags), set_terminated,
     and the artifacts (config.yaml, image.png and its preview): CPU and wall time.
The goal: <= 30 ms per job beyond inference, amortised over a 12-job sweep, with tracking on.
Prints medians [min-max] over the repeats and writes --out (JSON). Times depend on this machine's
load (each command's 1-minute load average is recorded; --max-load waits for a quieter machine):
compare figures of the same run, rerun when the CPU is shared.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
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
_STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]+\](?:\[\w+\] -)? "
_LAUNCH = re.compile(_STAMP + r"job (\d+) \(\d+/\d+")
_FINISHED = re.compile(_STAMP + r"job (\d+) \[.*\]: (?:FINISHED|FAILED)")  # a job's end
_CHECKED = re.compile(_STAMP + r"Checked the configs of the \d+ jobs in ([\d.]+) s")  # the up-front check


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def wait_for_quiet(max_load: float | None, max_wait: float) -> float:
    """The 1-minute load average, after waiting (up to max_wait seconds) for it to drop below max_load."""
    waited = 0.0
    while max_load is not None and os.getloadavg()[0] > max_load and waited < max_wait:
        time.sleep(15)
        waited += 15
    return os.getloadavg()[0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the runner and its writer, once waited for
    return usage.ru_utime + usage.ru_stime


def sweep(models_dir: Path, work: Path, name: str, extra: list[str], label: str) -> dict:
    """Run one multirun in a subprocess; its overhead from its wall time, the jobs' own inference
    times (jobs.csv) and the log's timestamps."""
    import shutil

    sweep_dir = work / f"{name}-{label}"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # the runner never writes into a used folder
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, DIFFSYNTH_MODEL_BASE_PATH=str(models_dir), PYTHONPATH=path)
    argv = [sys.executable, "-m", "runner", "-m", *model_overrides(name), *extra,
            f"tracking.store_dir={work / 'store'}", f"experiment=bench-{name}-{label}",
            f"hydra.sweep.dir={sweep_dir}"]
    cpu = _children_cpu()
    begun = time.time()
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    launches, finished, checked = {}, {}, None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := _LAUNCH.match(line):
            launches[int(m.group(2))] = _stamp(m.group(1))
        elif m := _FINISHED.match(line):
            finished[int(m.group(2))] = _stamp(m.group(1))
        elif m := _CHECKED.match(line):
            checked = float(m.group(2))
    rows = list(csv.DictReader(open(sweep_dir / "jobs.csv")))
    overheads, inference, lora = [], [], []
    for row in rows:
        i = int(row["job"])
        infer = sum(float(row[k]) for k in ("encode_s", "denoise_s", "decode_s"))
        inference.append(infer)
        lora.append(float(row["lora_s"] or 0))
        if i >= 1 and i + 1 in launches:
            overheads.append(launches[i + 1] - launches[i] - infer)
    load = float(rows[0]["load_s"] or 0)
    # everything the command took that is neither an image nor the weights' load, in three parts
    # (the log's stamps have a resolution of 1 ms; the process began at `begun`, on this clock):
    # start, to the first job's launch (Python, imports, Hydra, the check of every job); the jobs,
    # from the first launch to the last job's end; the end, to the process's end
    total = wall - sum(inference) - load
    start = launches[0] - begun
    last = max(finished.values())
    end = begun + wall - last
    return {"wall_s": wall, "cpu_s": cpu, "jobs": len(rows), "overhead_s": overheads, "total_overhead_s": total,
            "start_s": start, "check_s": checked, "jobs_s": last - launches[0] - sum(inference) - load,
            "end_s": end, "inference_s": inference, "lora_s": lora, "load_s": load, "loadavg": os.getloadavg()[0]}


def split_costs(small: dict, large: dict) -> tuple[float, float]:
    """(per job, per command) from two sweep sizes. What each more job adds: its share of the
    up-front check, of the time between the jobs and of the end; the rest of the command's
    overhead is paid once. (The slope of the whole overhead would be the same quantity, but
    the start-up's imports vary by tenths of a second from one command to the next on a shared
    machine, and they do not depend on the number of jobs.)"""
    n1, n2 = small["jobs"], large["jobs"]
    grows = [large[k] - small[k] for k in ("check_s", "jobs_s", "end_s")]
    per_job = sum(grows) / (n2 - n1)
    return per_job, large["total_overhead_s"] - per_job * n2


def cpu_per_job(small: dict, large: dict) -> float:
    return (large["cpu_s"] - small["cpu_s"]) / (large["jobs"] - small["jobs"])


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


def mlflow_floor(work: Path, jobs: int = 30) -> dict:
    """MLflow alone, per job as the runner's writer logs it, on a new SQLite store: the calls
    (create_run with the start's tags, one log_batch, set_terminated) and the artifacts, with
    as many tags, params and metrics as a job of the tiny sweep logs. CPU and wall, medians."""
    import shutil

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from PIL import Image

    folder = work / "floor"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("floor", artifact_location=(folder / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="parent").info.run_id
    start_tags = {f"runner.tag{i}": "x" * 40 for i in range(12)} | {"mlflow.parentRunId": parent}
    end_tags = [RunTag(f"end.tag{i}", "y" * 40) for i in range(22)]
    params = [Param(f"param.{i}", "value" * 4) for i in range(24)]
    files = folder / "files"
    (files / "images").mkdir(parents=True)
    (files / "config.yaml").write_text("a: 1\n" * 40)
    Image.new("RGB", (128, 128), (90, 120, 200)).save(files / "image.png")
    shutil.copyfile(files / "image.png", files / "images" / "image+step+0.png")
    Image.new("RGB", (128, 128), (90, 120, 200)).save(files / "images" / "image+step+0+compressed.webp")
    phases: dict[str, list[tuple[float, float]]] = {"calls": [], "artifacts": []}
    for n in range(jobs + 1):
        now = int(time.time() * 1000)
        t, c = time.perf_counter(), time.process_time()
        run = client.create_run(experiment, tags=start_tags, run_name=f"job {n}")
        metrics = [Metric(f"metric{i}", float(i), now, 0) for i in range(8)]
        client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=end_tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        calls = (time.perf_counter() - t, time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        client.log_artifacts(run.info.run_id, str(files))
        if n:  # the first warms MLflow's caches
            phases["calls"].append(calls)
            phases["artifacts"].append((time.perf_counter() - t, time.process_time() - c))
    return {k: {"wall_s": statistics.median(w for w, _ in v), "cpu_s": statistics.median(c for _, c in v)}
            for k, v in phases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--jobs", default="2,12", help="the two sweep sizes (the larger: the amortisation's)")
    parser.add_argument("--repeat", type=int, default=3, help="each sweep this many times (medians, spread)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "runner-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (dtype as the runner's auto)")
    parser.add_argument("--modes", default="none,mlflow,lora", help="which sweeps to run")
    parser.add_argument("--floor", action="store_true", help="also MLflow's own cost per job, alone")
    parser.add_argument("--max-load", type=float, default=None,
                        help="before each command wait (up to --max-wait s) for the 1-minute load to drop below this")
    parser.add_argument("--max-wait", type=float, default=600)
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
    modes = args.modes.split(",")
    results: dict = {}
    for name in names:
        r = results[name] = {"device": args.device, "sizes": sizes,
                             "baseline_s": baseline(models_dir, name, sizes[-1], args.device)}
        dev = f"device={args.device}"
        for repeat in range(args.repeat):
            for mode, extra in (("none", ["tracking=none"]), ("mlflow", [])):
                if mode in modes:
                    runs = []
                    for n in sizes:
                        wait_for_quiet(args.max_load, args.max_wait)
                        runs.append(sweep(models_dir, args.work, name, [seeds(n), dev, *extra], f"{mode}{n}"))
                    r.setdefault(mode, []).append(runs)
        if has_lora and "lora" in modes:
            lora = tiny_lora(models_dir, name, args.work / f"{name}-lora.safetensors")
            n = sizes[-1]
            alphas = "lora.alpha=" + ",".join(f"{a / n:g}" for a in range(1, n + 1))
            wait_for_quiet(args.max_load, args.max_wait)
            r["lora"] = sweep(models_dir, args.work, name,
                              ["lora=file", f"lora.path={lora}", alphas, dev, "tracking=none"], "lora")
    if args.floor:
        results["mlflow_floor"] = mlflow_floor(args.work)
    print_table(results, sizes)
    out = args.out or args.work / "sweep_overhead.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw figures: {out}")


def seeds(n: int) -> str:
    return "seed=" + ",".join(str(s) for s in range(n))


def spread(values: list[float], scale: float = 1000.0, unit: str = "ms", digits: int = 0) -> str:
    """`median [min-max]` of the repeats."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med, lo, hi = (f"{v * scale:.{digits}f}" for v in (statistics.median(values), min(values), max(values)))
    return f"{med}{unit} [{lo}-{hi}]" if len(values) > 1 else f"{med}{unit}"


def summary(runs: list[list[dict]]) -> dict[str, list[float]]:
    """Per repeat: per job, per command, steady, start, end, CPU per job, inference per job, load."""
    out: dict[str, list[float]] = {k: [] for k in ("per_job", "per_command", "steady", "start", "end", "cpu",
                                                   "inference", "load")}
    for small, big in runs:
        per_job, per_command = split_costs(small, big)
        out["per_job"].append(per_job)
        out["per_command"].append(per_command)
        out["cpu"].append(cpu_per_job(small, big))
        out["steady"].append(statistics.median(big["overhead_s"]) if big["overhead_s"] else None)
        out["start"].append(big["start_s"])
        out["end"].append(big["end_s"])
        out["inference"].append(statistics.median(big["inference_s"][1:]))
        out["load"].append(statistics.median([small["loadavg"], big["loadavg"]]))
    return out


def print_table(results: dict, sizes: list[int]) -> None:
    models = {k: v for k, v in results.items() if k != "mlflow_floor"}
    first = next(iter(models.values()), None)
    if first is not None:
        print(f"\n{first['device']}, {os.cpu_count()} CPU cores; sweeps of {sizes[0]} and {sizes[-1]} jobs; beyond the "
              f"jobs' own images and the weights' load; median [min-max] of the repeats")
    head = ("model", "mode", "inference/job", f"per job (of {sizes[-1]})", "per command", "steady/job", "start",
            "end", "CPU/job", "load")
    print(f"{head[0]:6} {head[1]:7} {head[2]:>14} {head[3]:>20} {head[4]:>20} {head[5]:>16} {head[6]:>18} "
          f"{head[7]:>18} {head[8]:>18} {head[9]:>5}")
    for name, r in models.items():
        print(f"{name:6} {'library':7} {spread(r['baseline_s'], 1, 's', 3):>14}")
        for mode in ("none", "mlflow"):
            if mode not in r:
                continue
            s = summary(r[mode])
            print(f"{name:6} {mode:7} {spread(s['inference'], 1, 's', 3):>14} {spread(s['per_job'], digits=1):>20} "
                  f"{spread(s['per_command'], 1, 's', 2):>20} {spread(s['steady'], digits=1):>16} "
                  f"{spread(s['start'], 1, 's', 2):>18} {spread(s['end'], 1, 's', 2):>18} {spread(s['cpu']):>18} "
                  f"{statistics.median(s['load']):5.1f}")
        if "lora" in r:
            print(f"{name:6} {'lora':7} alpha switch {spread(r['lora']['lora_s'][1:], digits=1)}")
    floor = results.get("mlflow_floor")
    if floor:
        calls, arts = floor["calls"], floor["artifacts"]
        print(f"\nMLflow alone (SQLite, per job): create_run + log_batch + set_terminated "
              f"{calls['cpu_s'] * 1000:.1f} ms CPU, {calls['wall_s'] * 1000:.1f} ms wall; "
              f"artifacts {arts['cpu_s'] * 1000:.1f} ms CPU, {arts['wall_s'] * 1000:.1f} ms wall")


if __name__ == "__main__":
    main()
