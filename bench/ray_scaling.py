"""How a sweep on Ray scales from 1 to 2 workers on a CPU (hydra/launcher=ray).

    python bench/ray_scaling.py                      # 12 jobs of the tiny model at 192x192, 8 steps (~1 s each)
    python bench/ray_scaling.py --jobs 16 --size 160 --steps 6

One local Ray runtime (2 CPUs, loopback) is started here; the same sweep
(`python -m runner -m hydra/launcher=ray seed=0..N-1`, tracking=none) runs on it with 1 and
then 2 workers of 1 thread each. From the job.json records: the time after the loads = the
last job's end minus the moment the last worker finished loading (its first job's start +
load_s), so process start and weight loading are left out. efficiency = time1 / (2 x time2)
(1.0 = perfect scaling; the target is >= 0.85). Times depend on the machine's load: on a
shared machine, rerun and compare the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def after_loads(sweep: Path) -> float:
    records = [json.loads(p.read_text()) for p in sweep.glob("*/job.json")]
    ready: dict[str, float] = {}
    for r in sorted(records, key=lambda r: r["started"]):
        ready.setdefault(r["tags"]["runner.worker"], r["started"] + r["metrics"].get("load_s", 0.0))
    assert all(r["status"] == "FINISHED" for r in records), [r["error"] for r in records]
    return max(r["ended"] for r in records) - max(ready.values())


def sweep(work: Path, address: str, workers: int, args) -> float:
    folder = work / f"sweep-{workers}"
    env = dict(os.environ, PYTHONPATH=str(REPO), DIFFSYNTH_MODEL_BASE_PATH=str(work / "models"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "runner", "-m", "model=qwen_image_tiny", "sampler=tiny", "progress_bar=false",
           "device=cpu", "tracking=none", f"sampler.height={args.size}", f"sampler.width={args.size}",
           f"sampler.steps={args.steps}", f"seed=range(0,{args.jobs})", "hydra/launcher=ray",
           f"hydra.launcher.address={address}", f"hydra.launcher.num_workers={workers}",
           "hydra.launcher.threads_per_worker=1", f"hydra.sweep.dir={folder}"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return after_loads(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    # Ray rewrites 127.0.0.1 into the machine's address unless told not to: the runtime stays on loopback
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    import ray

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    address = ray.init(address="local", num_cpus=2, include_dashboard=False).address_info["gcs_address"]
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    try:
        with tempfile.TemporaryDirectory(prefix="ray-scaling-") as tmp:
            from pipelines.demo.qwen_image_tiny import build_tiny_repo

            work = Path(tmp)
            build_tiny_repo(work / "models" / "tiny" / "Qwen-Image-Tiny")
            one = sweep(work, address, 1, args)
            two = sweep(work, address, 2, args)
    finally:
        ray.shutdown()
    per_job = one / args.jobs
    print(f"{args.jobs} jobs ({args.size}x{args.size}, {args.steps} steps, {per_job:.2f} s/job on 1 worker), "
          f"time after the loads: 1 worker {one:.2f} s, 2 workers {two:.2f} s")
    print(f"efficiency = time1 / (2 x time2) = {one / (2 * two):.2f}   (target >= 0.85)")


if __name__ == "__main__":
    main()
