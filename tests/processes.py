"""What the tests that start processes share: the environment of a `python -m runner` child,
a free loopback port, an MLflow server or UI waited for until it answers, a file rewritten as
`cp -p` leaves it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Mapping, Optional

REPO = Path(__file__).resolve().parent.parent


def runner_env(models: Path, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """`base` (this process's environment) for a runner child: this checkout importable, models
    under `models`, one thread, none of the variables that would redirect tracking or hold it."""
    e = dict(os.environ if base is None else base)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["DIFFSYNTH_MODEL_BASE_PATH"] = str(models)
    # one thread: the tiny model gains nothing from more, and OpenMP threads spinning on a
    # shared 2-core runner can make its small ops 30x slower
    e["OMP_NUM_THREADS"] = "1"
    for key in ("MLFLOW_TRACKING_URI", "RUNNER_HOLD", "RUNNER_HOLD_DIR", "HYDRA_FULL_ERROR"):
        e.pop(key, None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(command: str, args: list[str], folder: Path, env: Optional[Mapping[str, str]] = None,
                 timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`mlflow server|ui ARGS` on a free loopback port, in its own process group, its output in
    folder/<command>.log; returns once it answers /health (or fails with the log's tail)."""
    port = free_port()
    log_path = folder / f"{command}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", command, "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", *args], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """New content written into the same file (same inode), its size and modification time as
    before: what `cp -p`, `rsync -t` or `touch -r` leave behind."""
    before = path.stat()
    assert len(data) == before.st_size and data != path.read_bytes()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
