"""What one `python -m runner ...` costs around its image, against the plain library, fresh
processes on this CPU.

    python bench/command_cpu.py                      # tiny and mid-size models, 3 repeats
    python bench/command_cpu.py --models mid --repeats 5

The models are bench/sweep_overhead.py's (random weights in the hub layout, built once under
--work). Each repeat runs, each in a fresh process, timed from the process's start:
  library   a script: import the pipeline, from_pretrained, one image saved as PNG (the peer);
  none      `python -m runner <model>` with tracking=none;
  mlflow    the same with the default SQLite MLflow store (an existing store and experiment).
Two times each: `image`, when the image is on disk (the runner's "job 0 ... FINISHED" line, the
script's own print), and `exit`, when the command has ended (every MLflow write done). Prints
the medians and the ratios runner/library. Other processes on the machine disturb single runs:
compare the ratios, rerun with more --repeats when the CPU is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from sweep_overhead import MODELS, PROMPT, build_models, model_overrides  # noqa: E402
from warm_cpu import environment  # noqa: E402

LIBRARY = """
import sys, time
from pipelines.qwen_image import ModelConfig, QwenImagePipeline
import torch
model_id, size, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
patterns = ["transformer/diffusion_pytorch_model*.safetensors", "text_encoder/model*.safetensors",
            "vae/diffusion_pytorch_model.safetensors"]
pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.float32, device="cpu",
    model_configs=[ModelConfig(model_id=model_id, origin_file_pattern=p, skip_download=True) for p in patterns],
    tokenizer_config=ModelConfig(model_id=model_id, origin_file_pattern="tokenizer/", skip_download=True))
image = pipe(%r, seed=0, height=size, width=size, num_inference_steps=steps, cfg_scale=4.0, progress_bar=False)
image.save(out)
print("IMAGE", time.time(), flush=True)
""" % PROMPT


def run(argv: list[str], work: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the image, seconds to the exit) of one fresh process."""
    started_wall, started = time.time(), time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    exited = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:4])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("IMAGE "):
            return float(line.split()[1]) - started_wall, exited
        if "job 0 [" in line and "FINISHED in" in line:  # "[2026-12-01 10:00:00,123][runner][INFO] - job 0 ..."
            stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return stamp - started_wall, exited
    raise RuntimeError(f"no image line in the output of {' '.join(argv[1:4])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "runner-bench")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    names = args.models.split(",")
    build_models(args.work / "models", names)
    env = environment(args.work)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in names:
        model_id, size, steps = MODELS[name]
        out = args.work / "command-runs"
        store = f"tracking.store_dir={args.work / 'command-store'}"
        runner = [sys.executable, "-m", "runner", *model_overrides(name), store, f"experiment=command-{name}"]
        # one untimed tracked run: the store and the experiment exist, as for a user's second command
        shutil.rmtree(out, ignore_errors=True)
        run([*runner, f"hydra.run.dir={out / 'setup'}"], args.work, env)
        r = results[name] = {"library": [], "none": [], "mlflow": []}
        for i in range(args.repeats):  # interleaved: a load on the machine hits all three alike
            r["library"].append(run([sys.executable, "-c", LIBRARY, model_id, str(size), str(steps),
                                     str(out / f"library-{i}.png")], args.work, env))
            r["none"].append(run([*runner, "tracking=none", f"hydra.run.dir={out / f'none-{i}'}"], args.work, env))
            r["mlflow"].append(run([*runner, f"hydra.run.dir={out / f'mlflow-{i}'}"], args.work, env))
    print(f"\n{os.cpu_count()} CPU cores, fresh processes, medians of {args.repeats}; seconds from the process's start")
    print(f"{'model':6} {'command':8} {'image':>7} {'exit':>7} {'image/library':>14} {'exit/library':>13}")
    for name, r in results.items():
        lib_image = statistics.median(t[0] for t in r["library"])
        lib_exit = statistics.median(t[1] for t in r["library"])
        for mode, times in r.items():
            image, exit_ = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
            print(f"{name:6} {mode:8} {image:6.2f}s {exit_:6.2f}s {image / lib_image:14.2f} {exit_ / lib_exit:13.2f}")
    target = args.out or args.work / "command_cpu.json"
    target.write_text(json.dumps(results, indent=1))
    print(f"\nraw figures: {target}")


if __name__ == "__main__":
    main()
