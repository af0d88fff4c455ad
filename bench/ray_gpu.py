"""Images per second of a sweep on Ray against the number of GPUs (a GPU machine; not run in CI).

    python bench/ray_gpu.py                                  # Qwen-Image, 1, 2, 4, ... GPUs of this machine
    python bench/ray_gpu.py --model qwen_image_tiny --jobs 32 --steps 4

For n = 1, 2, 4, ... up to the GPUs of this machine: the same sweep (`seed=0..jobs-1`,
tracking=none) with `hydra/launcher=ray hydra.launcher.num_workers=n`, one GPU per worker, on
a local Ray runtime. images/s = jobs / (last job's end - the moment the last worker finished
loading), from the job.json records: weight loading is left out. Prints images/s and the
speed-up against 1 GPU (ideal: n).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_scaling import REPO, after_loads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen_image")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    assert gpus, "no CUDA device"
    counts = [n for n in (1, 2, 4, 8, 16) if n <= gpus]
    with tempfile.TemporaryDirectory(prefix="ray-gpu-") as tmp:
        rates = {}
        for n in counts:
            folder = Path(tmp) / f"sweep-{n}"
            cmd = [sys.executable, "-m", "runner", "-m", f"model={args.model}", f"sampler.steps={args.steps}",
                   "progress_bar=false", "device=cuda", "tracking=none", f"seed=range(0,{args.jobs})",
                   "hydra/launcher=ray", f"hydra.launcher.num_workers={n}", "hydra.launcher.num_gpus_per_worker=1",
                   f"hydra.sweep.dir={folder}"]
            subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            rates[n] = args.jobs / after_loads(folder)
            print(f"{n} GPU(s): {rates[n]:.3f} images/s, speed-up {rates[n] / rates[1]:.2f} (ideal {n})", flush=True)


if __name__ == "__main__":
    main()
