"""What `keep_warm` saves: time from command start to image, fresh processes, on this CPU.

    python bench/warm_cpu.py                        # the mid-size model (~40M-parameter DiT), 3 repeats
    python bench/warm_cpu.py --model tiny --repeats 5

The models are bench/sweep_overhead.py's (random weights in the hub layout, built once under
--work). Every command is `python -m runner <model> tracking=none` (MLflow left out: its store
costs the same with and without a worker), timed from its start to its exit (the image is its
last write):
  (a) cold      a command without keep_warm: imports, load, image
  (b) warm      a command with keep_warm=15m while the worker is warm (started by one command
                before, not timed): imports, handing the job over, image
  (c) in-proc   the second image of one process (job 1 of a 2-job sweep, its `total_s`):
                what a warm image costs without any command around it
  (d) imports   process start and what every command imports, worker or not: the runner, torch
                and the pipeline class (its argument checks run before any load)
Prints the medians and the ratios b/a (what a warm command costs against a cold one) and b/c
(against a bare warm image); the target is b ~ c + d. Other processes on the machine disturb
single runs: compare the ratios, rerun with more --repeats when the CPU is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from sweep_overhead import MODELS, build_models, model_overrides  # noqa: E402

IMPORTS = "import runner.app, runner.build.pipeline, torch, pipelines; pipelines.QwenImagePipeline"


def environment(work: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, DIFFSYNTH_MODEL_BASE_PATH=str(work / "models"), DIFFSYNTH_SKIP_DOWNLOAD="True",
                PYTHONPATH=path, RUNNER_WARM_DIR=str(work / "warm"))


def timed(argv: list[str], work: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def command(work: Path, env: dict[str, str], model: str, name: str, *extra: str) -> float:
    folder = work / "runs" / name
    shutil.rmtree(folder, ignore_errors=True)  # the runner never writes into a used folder
    argv = [sys.executable, "-m", "runner", *model_overrides(model), "tracking=none", *extra,
            f"hydra.run.dir={folder}"]
    return timed(argv, work, env)


def in_process(work: Path, env: dict[str, str], model: str) -> float:
    """`total_s` of the second job of a sweep: a warm image in a process that stays."""
    folder = work / "runs" / "sweep"
    shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, "-m", "runner", "-m", *model_overrides(model), "tracking=none", "seed=0,1",
            f"hydra.sweep.dir={folder}"]
    timed(argv, work, env)
    return json.loads((folder / "1" / "job.json").read_text())["metrics"]["total_s"]


def measure(work: Path, model: str, repeats: int) -> dict[str, list[float]]:
    env = environment(work)
    times: dict[str, list[float]] = {"cold": [], "warm": [], "in-proc": [], "imports": []}
    try:
        starting = command(work, env, model, "start", "keep_warm=15m")
        print(f"first command with keep_warm (starts the worker, loads): {starting:.2f} s", flush=True)
        for i in range(repeats):
            times["cold"].append(command(work, env, model, f"cold{i}"))
            times["warm"].append(command(work, env, model, f"warm{i}", "keep_warm=15m"))
            times["in-proc"].append(in_process(work, env, model))
            times["imports"].append(timed([sys.executable, "-c", IMPORTS], work, env))
            print("  ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "runner", "warm", "stop"], cwd=work, env=env)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/warm_bench"))
    parser.add_argument("--out", type=Path, help="the medians and ratios, as JSON")
    args = parser.parse_args()
    work = args.work.resolve()
    build_models(work / "models", [args.model])
    times = measure(work, args.model, args.repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"warm/cold": median["warm"] / median["cold"], "warm/in-proc": median["warm"] / median["in-proc"],
              "warm/(in-proc+imports)": median["warm"] / (median["in-proc"] + median["imports"])}
    size, steps = MODELS[args.model][1:]
    print(f"\n{args.model} model, {size}x{size}, {steps} steps, {os.cpu_count()} CPUs; medians of {args.repeats}:")
    for key, value in median.items():
        print(f"  {key:8s} {value:7.2f} s   (min {min(times[key]):.2f})")
    for key, value in ratios.items():
        print(f"  {key:24s} {value:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "times": times, "median": median, "ratios": ratios},
                                       indent=1))


if __name__ == "__main__":
    main()
