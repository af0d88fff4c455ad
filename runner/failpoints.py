"""Named hold points, so that fault-injection tests synchronise on events instead of speed.

    RUNNER_HOLD=job2,sweep_end RUNNER_HOLD_DIR=/tmp/x python -m runner -m ...

At a listed point the process writes `<dir>/<name>.held` (holding its pid) and waits until
`<dir>/<name>.go` exists. A test waits for the `.held` file, does its fault (a signal, a
kill -9, stopping the tracking server), then creates `.go`. The points:

    job<N>      at the start of job N's computation (its MLflow run has been requested)
    sweep_end   at the start of the end-of-sweep writes (grid, report, jobs.csv, parent run)
    writer_connect  in the MLflow writer process, before it opens the store
    claim       a run or sweep found its folder free and is about to claim it (runner.files)

Without RUNNER_HOLD this is one dictionary lookup.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def hold(name: str) -> None:
    names = os.environ.get("RUNNER_HOLD")
    if not names or name not in names.split(","):
        return
    folder = Path(os.environ.get("RUNNER_HOLD_DIR") or ".")
    (folder / f"{name}.held").write_text(str(os.getpid()))
    go = folder / f"{name}.go"
    while not go.exists():  # a signal arriving here acts as it would mid-job
        time.sleep(0.01)
