"""`python -m runner -m hydra/launcher=ray ...` end to end: subprocess sweeps on the embedded
tiny model, against real SQLite MLflow stores, on a real Ray runtime on loopback (one for the
module, started here with 2 CPUs; each sweep joins it with 2 one-thread workers), real
signals and real kill -9. Faults are timed by the runner's hold points (runner/failpoints.py,
forwarded to the workers), never by sleeps or speed; no test asserts a time.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .processes import free_port, runner_env

SMALL = ["model=qwen_image_tiny", "sampler=tiny", "sampler.height=64", "sampler.width=64", "sampler.steps=2",
         "progress_bar=false", "prompt=a red fox in the snow", "device=cpu"]
TERMINAL = {"FINISHED", "FAILED", "KILLED"}
MODELS_SEED = 5  # not the demo builder's (0): a model built by a worker would differ
# Ray rewrites 127.0.0.1 into the machine's address unless told not to: the runtime stays on loopback
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

pytestmark = [pytest.mark.slow, pytest.mark.needs("ray")]  # the in-process units: tests/test_runner_units.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The module's Ray runtime, and the models folder that only the drivers' environment names
    (DIFFSYNTH_MODEL_BASE_PATH, not in the runtime's own): it holds the tiny model built with
    another seed than the demo's builder, so a worker that missed the variable would build and
    use other weights (in its working directory's ./models)."""
    from pipelines.demo.qwen_image_tiny import build_tiny_repo

    root = tmp_path_factory.mktemp("runner_ray")
    models = root / "models"
    build_tiny_repo(models / "tiny" / "Qwen-Image-Tiny", seed=MODELS_SEED)
    saved = dict(os.environ)
    os.environ.update(LOOPBACK_ENV)
    os.environ.pop("DIFFSYNTH_MODEL_BASE_PATH", None)
    import ray

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    context = ray.init(address="local", num_cpus=2, include_dashboard=False)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    e = runner_env(models)  # with what ray.init set for its drivers (the auth mode)
    launcher = ["hydra/launcher=ray", f"hydra.launcher.address={context.address_info['gcs_address']}",
                "hydra.launcher.num_workers=2", "hydra.launcher.threads_per_worker=1"]
    try:
        yield {"root": root, "models": models, "env": e, "ray": launcher}
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def argv(env, cwd: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "runner", *args, f"tracking.store_dir={cwd / 'store'}",
            f"hydra.sweep.dir={cwd}/sweep-{len(list(cwd.glob('sweep-*')))}"]


def run(env, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv(env, cwd, *args), cwd=cwd, env=env["env"], capture_output=True, text=True,
                          timeout=300)


def start(env, cwd: Path, *args: str, hold: str) -> subprocess.Popen:
    (cwd / "holds").mkdir(parents=True, exist_ok=True)
    e = dict(env["env"], RUNNER_HOLD=hold, RUNNER_HOLD_DIR=str(cwd / "holds"))
    return subprocess.Popen(argv(env, cwd, *args), cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_until(check, proc: subprocess.Popen | None, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert proc is None or proc.poll() is None, f"the runner ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)
    return found


def held(cwd: Path, name: str, proc: subprocess.Popen) -> int:
    """The pid of the worker that reached hold point `name`; the file is removed, so that a
    later arrival (a retry) is seen anew."""
    path = cwd / "holds" / f"{name}.held"
    wait_until(lambda: path.is_file() and path.read_text(), proc, path.name)
    pid = int(path.read_text())
    path.unlink()
    return pid


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def kill_worker(pid: int, proc: subprocess.Popen) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), proc, f"the end of worker {pid}")


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_exit(code: int, expected: int, text: str) -> None:
    assert code == expected, f"exit {code}\n{text[-6000:]}"
    assert "Traceback" not in text, text[-6000:]


def runs(cwd: Path, experiment: str):
    """(parents, children by job number) of `experiment` in the test's store."""
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{cwd / 'store' / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    found = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    parents = [r for r in found if r.data.tags.get("runner.kind") == "sweep"]
    children = sorted((r for r in found if r.data.tags.get("runner.kind") == "job"),
                      key=lambda r: int(r.data.tags["runner.job_num"]))
    return parents, children


def table(sweep: Path) -> list[dict]:
    return list(csv.DictReader(open(sweep / "jobs.csv")))


def tiny_lora(models: Path, out: Path, rank: int = 4) -> Path:
    """A diffusers/peft-format LoRA for the tiny transformer, shapes read from its files."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for shard in sorted((models / "tiny" / "Qwen-Image-Tiny" / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if ".attn.to_" in key and key.endswith(".weight"):
                    out_f, in_f = f.get_slice(key).get_shape()
                    base = "transformer." + key[: -len(".weight")]
                    tensors[f"{base}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.5
                    tensors[f"{base}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
    save_file(tensors, str(out))
    return out


# --------------------------------------------------------------------------- tests


def test_a_ray_sweep_gives_the_sequential_sweeps_images_and_records_loading_once_per_worker(env, tmp_path):
    lora = tiny_lora(env["models"], tmp_path / "lora.safetensors")
    sweep = [*SMALL, "lora=file", f"lora.path={lora}", "lora.alpha=1,0", "seed=0,1,2,3"]
    plain = run(env, tmp_path, "-m", *sweep, "experiment=sequential")
    assert_exit(plain.returncode, 0, plain.stdout + plain.stderr)
    on_ray = run(env, tmp_path, "-m", *sweep, "experiment=ray", *env["ray"])
    assert_exit(on_ray.returncode, 0, on_ray.stdout + on_ray.stderr)

    for n in range(8):  # the same pixels, bit for bit, and the same generation parameters
        a, b = Image.open(tmp_path / "sweep-0" / str(n) / "image.png"), Image.open(tmp_path / "sweep-1" / str(n) /
                                                                                    "image.png")
        assert np.array_equal(np.asarray(a), np.asarray(b)), n
        assert a.text["generation"] == b.text["generation"]
    assert [r["status"] for r in table(tmp_path / "sweep-1")] == ["FINISHED"] * 8

    [seq_parent], seq = runs(tmp_path, "sequential")
    [parent], children = runs(tmp_path, "ray")
    assert parent.info.status == "FINISHED" and [ch.info.status for ch in children] == ["FINISHED"] * 8
    # the workers loaded the driver's models folder: no model built anywhere else, the same checkpoint
    assert not (tmp_path / "models").exists() and "Building tiny/Qwen-Image-Tiny" not in on_ray.stdout + on_ray.stderr
    assert len(seq) == 8 and len({ch.data.tags["checkpoint.sha256"] for ch in seq}) == 1
    for mine, theirs in zip(children, seq):
        for key in ("checkpoint.sha256", "checkpoint.files", "lora.file.sha256"):
            assert mine.data.tags[key] == theirs.data.tags[key], key
    assert [ch.data.tags["mlflow.parentRunId"] for ch in children] == [parent.info.run_id] * 8
    assert {k: v for k, v in parent.data.params.items() if k != "experiment"} == {
        k: v for k, v in seq_parent.data.params.items() if k != "experiment"}
    for mine, theirs in zip(children, seq):
        assert {k: v for k, v in mine.data.params.items() if k != "experiment"} == {
            k: v for k, v in theirs.data.params.items() if k != "experiment"}
        assert mine.info.run_name == theirs.info.run_name
        assert mine.data.tags["runner.job_dir"] == str(tmp_path / "sweep-1" / mine.data.tags["runner.job_num"])
    workers: dict[str, list] = {}
    for ch in children:
        workers.setdefault(ch.data.tags["runner.worker"], []).append(ch)
    assert len(workers) == 2  # both workers ran jobs, and each loaded the weights once
    for jobs in workers.values():
        assert {ch.data.tags["runner.worker_loads"] for ch in jobs} == {"1"}
        assert sum(ch.data.metrics["load_s"] > 0 for ch in jobs) == 1


def test_a_killed_worker_has_its_job_run_again_then_failed(env, tmp_path):
    """Job 1's worker is killed once: the job runs again and finishes. Job 3's worker is killed
    on both tries: it is recorded FAILED, the sweep goes on and exits 1."""
    proc = start(env, tmp_path, "-m", *SMALL, "seed=0,1,2,3", "experiment=kill", *env["ray"], hold="job1,job3")
    kill_worker(held(tmp_path, "job1", proc), proc)
    (tmp_path / "holds" / "job1.go").write_text("")
    first = held(tmp_path, "job3", proc)
    kill_worker(first, proc)
    second = held(tmp_path, "job3", proc)
    assert second != first  # another (or a new) worker
    kill_worker(second, proc)
    (tmp_path / "holds" / "job3.go").write_text("")
    out, err = finish(proc)
    text = out + err
    assert_exit(proc.returncode, 1, text)
    assert "job 1 [seed=1]: its Ray worker died" in text and "1 job(s) failed" in text

    assert [r["status"] for r in table(tmp_path / "sweep-0")] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert (tmp_path / "sweep-0" / "1" / "image.png").is_file()
    record = json.loads((tmp_path / "sweep-0" / "3" / "job.json").read_text())
    assert record["status"] == "FAILED" and "WorkerDied" in record["error"] and "Fix:" in record["error"]
    [parent], children = runs(tmp_path, "kill")
    assert parent.info.status == "FAILED"
    assert [ch.info.status for ch in children] == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert "WorkerDied" in children[3].data.tags["runner.error"]


def test_ctrl_c_kills_the_workers_and_ends_the_runs_killed(env, tmp_path):
    proc = start(env, tmp_path, "-m", *SMALL, "seed=0,1,2,3,4,5", "experiment=interrupt", *env["ray"],
                 hold="job2,job3")
    workers = [held(tmp_path, "job2", proc), held(tmp_path, "job3", proc)]  # both workers are in a job
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert_exit(proc.returncode, 130, out + err)
    for pid in workers:
        wait_until(lambda: gone(pid), None, f"the end of worker {pid}")

    parents, children = runs(tmp_path, "interrupt")
    assert len(parents) == 1 and len(children) == 4 and all(r.info.status in TERMINAL for r in parents + children)
    assert parents[0].info.status == "KILLED"
    assert [ch.info.status for ch in children] == ["FINISHED", "FINISHED", "KILLED", "KILLED"]  # 4, 5 never began
    assert [r["status"] for r in table(tmp_path / "sweep-0")] == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    assert json.loads((tmp_path / "sweep-0" / "2" / "job.json").read_text())["status"] == "KILLED"


def test_resume_skips_what_a_sequential_sweep_finished(env, tmp_path):
    plain = run(env, tmp_path, "-m", *SMALL, "seed=0,1", "experiment=resume")
    assert_exit(plain.returncode, 0, plain.stdout + plain.stderr)
    on_ray = run(env, tmp_path, "-m", *SMALL, "seed=0,1,2", "experiment=resume", "resume=true", *env["ray"])
    assert_exit(on_ray.returncode, 0, on_ray.stdout + on_ray.stderr)
    assert [r["status"] for r in table(tmp_path / "sweep-1")] == ["SKIPPED", "SKIPPED", "FINISHED"]
    assert (tmp_path / "sweep-1" / "0" / "image.png").is_file()  # the finished run's image, fetched
    parents, children = runs(tmp_path, "resume")
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
    new = [ch for ch in children if ch.data.tags["mlflow.parentRunId"] == parents[1].info.run_id]
    assert [ch.data.params["seed"] for ch in new] == ["2"] and new[0].info.status == "FINISHED"


def test_a_cluster_address_where_nothing_answers_is_refused_at_once(env, tmp_path):
    """Ray's own join would retry for minutes (beyond run()'s timeout): a TCP probe refuses it."""
    port = free_port()  # nothing listens on it
    result = run(env, tmp_path, "-m", *SMALL, "seed=0,1", "experiment=nocluster", "hydra/launcher=ray",
                 f"hydra.launcher.address=127.0.0.1:{port}")
    text = result.stdout + result.stderr
    assert_exit(result.returncode, 1, text)
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers" in text
    assert "Fix: start the cluster first (`ray start --head" in text
    parents, children = runs(tmp_path, "nocluster")
    assert [p.info.status for p in parents] == ["FAILED"] and children == []


def blocker(cpus: int):
    """An actor of the test's own that holds `cpus` of the cluster's 2 CPUs (placed: it answered)."""
    import ray

    @ray.remote(num_cpus=cpus)
    class Blocker:
        def ping(self) -> int:
            return os.getpid()

    actor = Blocker.remote()
    ray.get(actor.ping.remote(), timeout=120)
    return actor


def test_a_pool_whose_workers_cannot_be_placed_stops_after_start_timeout_s(env, tmp_path):
    import ray

    block = blocker(2)  # the cluster's CPUs are taken: neither worker can be placed
    try:
        result = run(env, tmp_path, "-m", *SMALL, "seed=0,1", "experiment=unplaced", *env["ray"],
                     "hydra.launcher.start_timeout_s=3")
    finally:
        ray.kill(block)
    text = result.stdout + result.stderr
    assert_exit(result.returncode, 1, text)
    assert "no Ray worker started within 3 s: each worker needs 1 CPU(s) and 0 GPU(s); free in the cluster: 0 CPU(s)" \
        in text
    assert "Fix: free those resources" in text and "hydra.launcher.start_timeout_s" in text
    parents, children = runs(tmp_path, "unplaced")
    assert [p.info.status for p in parents] == ["FAILED"] and children == []


def test_a_worker_placed_after_the_sweep_began_joins_it(env, tmp_path):
    """One CPU taken: the sweep begins on the one worker Ray could place; freeing the CPU
    places the other, which takes the next job while the first is still in its job."""
    import ray

    block = blocker(1)
    proc = start(env, tmp_path, "-m", *SMALL, "seed=0,1", "experiment=join", *env["ray"], hold="job0,job1")
    try:
        first = held(tmp_path, "job0", proc)
    finally:
        ray.kill(block)
    second = held(tmp_path, "job1", proc)  # job 0 still holds the first worker: a second one runs job 1
    assert second != first
    for name in ("job0", "job1"):
        (tmp_path / "holds" / f"{name}.go").write_text("")
    out, err = finish(proc)
    text = out + err
    assert_exit(proc.returncode, 0, text)
    assert "Ray: 1 of 2 workers started" in text and "joined the sweep" in text
    _, children = runs(tmp_path, "join")
    assert [ch.info.status for ch in children] == ["FINISHED", "FINISHED"]
    assert children[0].data.tags["runner.worker"] != children[1].data.tags["runner.worker"]
