"""Warm workers (`keep_warm=...`, runner/execution/warm/) against real `python -m runner` subprocesses on
the tiny model: the second command reuses the loaded weights and leaves the very same image, PNG
metadata and MLflow params as a command without keep_warm; a worker exits by itself when idle;
Ctrl-C stops the job in the worker, which stays warm; a killed worker makes the next command
warn and run in its own process, and a worker killed during a job has that job run again in
the command; a command arriving while the worker is busy waits for it (saying so) and is then
served by it; a LoRA file or checkpoint rewritten between commands is used anew; `runner warm
stop`; a folder open to other users is refused.
Each test's workers live in a folder under tmp_path, and a fixture stops every one of them at
teardown (and asserts that none outlived the test).

Waits are on events (the worker's lock file, held from its start to its exit), never on sleeps
of a guessed length; no test asserts a time. Only the test that compares MLflow runs tracks them
(a new SQLite store costs a command more than its image).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from runner.execution.warm import folder as warm
from runner.execution.warm.protocol import Channel
from runner.execution.warm.worker import Worker

from .processes import rewrite_keeping_size_and_mtime, runner_env

SMALL = ["model=qwen_image_tiny", "sampler=tiny", "sampler.height=64", "sampler.width=64", "sampler.steps=2",
         "progress_bar=false", "prompt=a red fox in the snow", "seed=7", "device=cpu"]
OTHER = [*SMALL[:-3], "prompt=a grey cat on a red sofa", "seed=8", "device=cpu"]  # another job for the same weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    from pipelines.demo.qwen_image_tiny import build_tiny_repo

    models = tmp_path_factory.mktemp("warm_models")
    build_tiny_repo(models / "tiny" / "Qwen-Image-Tiny")
    e = runner_env(models)
    e["DIFFSYNTH_SKIP_DOWNLOAD"] = "True"
    e.pop(warm.DIR_ENV, None)
    return e


def run(env: dict[str, str], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def job(env: dict[str, str], cwd: Path, name: str, *extra: str, base: list[str] = SMALL,
        timeout: float = 300) -> tuple[subprocess.CompletedProcess, Path]:
    """One single-image command (`base`, then `extra`) writing into `cwd/name`; asserts it succeeded."""
    proc = run(env, cwd, *base, *extra, f"hydra.run.dir={cwd / name}", timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, cwd / name


def record(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def outputs(job_dir: Path) -> tuple[bytes, dict]:
    from PIL import Image

    with Image.open(job_dir / "image.png") as image:
        text = dict(image.text)
    return (job_dir / "image.png").read_bytes(), text


def mlflow_run(cwd: Path, job_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qwen-image")
    where = f"tags.`runner.job_dir` = '{job_dir.resolve()}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=where)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    return runs[0]


def without_keep_warm(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "keep_warm"}


def wait_until(check, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.05)
    return found


def the_worker(folder: Path) -> dict:
    live = [w for w in warm.workers(folder) if w["alive"]]
    assert len(live) == 1, live
    return live[0]


def start_warm(env: dict[str, str], cwd: Path, name: str, holds: Optional[Path] = None,
               stderr: int = subprocess.PIPE, stdout: Any = subprocess.PIPE) -> subprocess.Popen:
    """A keep_warm single-image command into cwd/name, not waited for; with `holds`, its job
    stops at hold point job0 (in the worker, or in the command if it runs the job itself)."""
    hold = {"RUNNER_HOLD": "job0", "RUNNER_HOLD_DIR": str(holds)} if holds is not None else {}
    argv = [sys.executable, "-m", "runner", *SMALL, "keep_warm=15m", "tracking=none", f"hydra.run.dir={cwd / name}"]
    return subprocess.Popen(argv, cwd=cwd, env=dict(env, **hold), stdout=stdout, stderr=stderr, text=True)


def held_in_worker(folder: Path, holds: Path, proc: subprocess.Popen) -> dict:
    """The warm worker, once `proc`'s job is held in it (not in the command)."""
    held = holds / "job0.held"
    wait_until(lambda: held.exists() and held.read_text() or proc.poll() is not None, "job held in the worker")
    worker = the_worker(folder)
    assert held.read_text() == str(worker["pid"])  # the job runs in the worker
    return worker


@pytest.fixture(scope="module")
def reference(base_env, tmp_path_factory):
    """The same jobs without keep_warm (SMALL; OTHER under "other"): loaded and computed in the
    command's own process."""
    cwd = tmp_path_factory.mktemp("warm_reference")
    found = {}
    for name, base in (("cold", SMALL), ("other", OTHER)):
        _, job_dir = job(base_env, cwd, name, base=base)
        run_ = mlflow_run(cwd, job_dir)
        found[name] = {"outputs": outputs(job_dir), "params": run_.data.params, "metrics": set(run_.data.metrics)}
    return found["cold"] | {"other": found["other"]}


@pytest.fixture
def warm_env(base_env, tmp_path):
    """RUNNER_WARM_DIR under tmp_path (short: a socket path has at most 107 bytes); every
    worker started there is stopped at teardown, and none may have outlived its stop."""
    folder = tmp_path / "w"
    yield dict(base_env, **{warm.DIR_ENV: str(folder)}), folder
    if not folder.exists():
        return
    os.chmod(folder, 0o700)
    not_stopped = warm.stop_all(folder, wait=60)
    left = [w for w in warm.workers(folder) if w["alive"]]
    for info in left:  # never leave a process behind, even when the assertion below fails
        os.kill(info["pid"], signal.SIGKILL)
    assert not not_stopped and not left, f"warm workers outlived their stop: {left}"


def test_the_second_command_reuses_the_loaded_weights_with_identical_results(warm_env, reference, tmp_path):
    env, folder = warm_env
    cwd = tmp_path / "work"
    # tracking is no part of a worker's identity: only the second command's MLflow run is compared
    first, first_dir = job(env, cwd, "first", "keep_warm=15m", "tracking=none")
    assert "Warm worker pid" in first.stdout + first.stderr
    worker = the_worker(folder)
    second, second_dir = job(env, cwd, "second", "keep_warm=15m")
    third, third_dir = job(env, cwd, "third", "keep_warm=15m", base=OTHER)  # another seed and prompt

    # no load in the later commands: the worker's counters, the jobs' records, their MLflow metrics
    again = the_worker(folder)
    assert again["pid"] == worker["pid"] and again["loads"] == 1 and again["jobs"] == 3
    assert record(first_dir)["metrics"]["load_s"] > 0
    for proc, job_dir in ((second, second_dir), (third, third_dir)):
        assert record(job_dir)["metrics"]["load_s"] == 0.0
        assert "Loading qwen_image_tiny" not in proc.stdout + proc.stderr
        assert "weights loaded, no load" in proc.stdout + proc.stderr

    # what a command without keep_warm leaves: the same bytes, PNG text, MLflow params and metric names
    assert outputs(first_dir) == reference["outputs"] and outputs(second_dir) == reference["outputs"]
    assert outputs(third_dir) == reference["other"]["outputs"] != reference["outputs"]
    for job_dir, cold in ((second_dir, reference), (third_dir, reference["other"])):
        logged = mlflow_run(cwd, job_dir)
        assert without_keep_warm(logged.data.params) == without_keep_warm(cold["params"])
        assert logged.data.params["keep_warm"] == "15m"
        assert set(logged.data.metrics) == cold["metrics"] and logged.data.metrics["load_s"] == 0.0

    status = run(env, cwd, "warm", "status")
    assert status.returncode == 0 and f"pid {worker['pid']}" in status.stdout and "jobs 3" in status.stdout
    stop = run(env, cwd, "warm", "stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not warm.is_alive(folder, worker["wid"])  # stop returns once the worker has exited
    assert not list(folder.glob("*.sock")) and not list(folder.glob("*.json"))
    assert "no warm worker" in run(env, cwd, "warm", "status").stdout


def test_an_idle_worker_exits_by_itself(warm_env, tmp_path):
    env, folder = warm_env
    job(env, tmp_path / "work", "only", "keep_warm=2s", "tracking=none")
    wid = next(folder.glob("*.lock")).stem
    wait_until(lambda: not warm.is_alive(folder, wid), "exit of the idle worker")
    assert "no command for 2s: exiting" in (folder / f"{wid}.log").read_text()
    assert not list(folder.glob("*.sock")) and not list(folder.glob("*.json"))


def test_ctrl_c_stops_the_job_in_the_worker_which_stays_warm(warm_env, tmp_path):
    env, folder = warm_env
    cwd, holds = tmp_path / "work", tmp_path / "holds"
    cwd.mkdir()
    holds.mkdir()
    proc = start_warm(env, cwd, "cut", holds)
    try:
        worker = held_in_worker(folder, holds, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert record(cwd / "cut")["status"] == "KILLED" and not (cwd / "cut" / "image.png").exists()

    _, job_dir = job(env, cwd, "after", "keep_warm=15m", "tracking=none")
    again = the_worker(folder)
    assert again["pid"] == worker["pid"] and again["jobs"] == 2
    assert record(job_dir)["status"] == "FINISHED"


def test_a_killed_worker_makes_the_next_command_run_here(warm_env, reference, tmp_path):
    env, folder = warm_env
    cwd = tmp_path / "work"
    job(env, cwd, "first", "keep_warm=15m", "tracking=none")
    worker = the_worker(folder)
    os.kill(worker["pid"], signal.SIGKILL)
    wait_until(lambda: not warm.is_alive(folder, worker["wid"]), "exit of the killed worker")
    assert (folder / f"{worker['wid']}.sock").exists()  # what a killed worker leaves behind

    after, job_dir = job(env, cwd, "after", "keep_warm=15m", "tracking=none")
    text = after.stdout + after.stderr
    assert "Warm worker not used" in text and "is gone" in text and "The job runs in this process" in text
    assert record(job_dir)["metrics"]["load_s"] > 0  # loaded in the command's own process
    assert outputs(job_dir) == reference["outputs"]
    assert not (folder / f"{worker['wid']}.sock").exists()  # cleaned: the next command starts a new worker


def test_a_frozen_worker_is_left_and_the_next_command_runs_the_job_itself(warm_env, reference, tmp_path):
    """A worker stopped with SIGSTOP accepts the connection (the kernel queues it) and never
    answers: the next command notices that its heartbeat stopped, says so, and runs the job
    itself instead of waiting for ever (the bound is the command's own timeout here)."""
    env, folder = warm_env
    cwd = tmp_path / "work"
    job(env, cwd, "first", "keep_warm=15m", "tracking=none")
    worker = the_worker(folder)
    os.kill(worker["pid"], signal.SIGSTOP)
    try:
        after, job_dir = job(dict(env, **{warm.FROZEN_ENV: "3"}), cwd, "after", "keep_warm=15m", "tracking=none",
                             timeout=120)
        text = after.stdout + after.stderr
        assert f"the warm worker pid {worker['pid']} does not answer (no heartbeat for" in text, text[-3000:]
        assert "this command left it as it is" in text and "The job runs in this process" in text
        assert record(job_dir)["metrics"]["load_s"] > 0 and outputs(job_dir) == reference["outputs"]
        assert the_worker(folder)["pid"] == worker["pid"]  # not ours: left alone
    finally:
        os.kill(worker["pid"], signal.SIGCONT)  # the fixture stops it


def test_a_worker_killed_during_the_job_has_the_job_run_again_here(warm_env, reference, tmp_path):
    env, folder = warm_env
    cwd, holds = tmp_path / "work", tmp_path / "holds"
    cwd.mkdir()
    holds.mkdir()
    proc = start_warm(env, cwd, "cut", holds)
    held = holds / "job0.held"
    try:
        worker = held_in_worker(folder, holds, proc)
        held.unlink()
        os.kill(worker["pid"], signal.SIGKILL)
        # the command runs the job itself: it reaches the same hold point, in its own process
        wait_until(lambda: held.exists() and held.read_text() or proc.poll() is not None, "job held in the command")
        assert held.read_text() == str(proc.pid)
        (holds / "job0.go").write_text("")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out + err
    assert proc.returncode == 0, text[-3000:]
    assert f"Warm worker pid {worker['pid']} ended during the job" in text and "The job runs again in this" in text
    assert record(cwd / "cut")["status"] == "FINISHED" and record(cwd / "cut")["metrics"]["load_s"] > 0
    assert outputs(cwd / "cut") == reference["outputs"]


def test_a_command_arriving_while_the_worker_is_busy_waits_for_it_then_uses_it(warm_env, reference, tmp_path):
    env, folder = warm_env
    cwd, holds = tmp_path / "work", tmp_path / "holds"
    cwd.mkdir()
    holds.mkdir()
    first = start_warm(env, cwd, "first", holds, stderr=subprocess.STDOUT)
    second, log = None, tmp_path / "second.log"
    try:
        worker = held_in_worker(folder, holds, first)
        with open(log, "w") as out:  # the hold is the first command's: the second one's job is not held
            second = start_warm(env, cwd, "second", stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "is busy with another command: this one waits" in log.read_text()
                   or second.poll() is not None, "the second command's notice")
        assert second.poll() is None, log.read_text()[-3000:]
        (holds / "job0.go").write_text("")
        assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
        assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert the_worker(folder)["pid"] == worker["pid"] and the_worker(folder)["jobs"] == 2
    assert record(cwd / "second")["metrics"]["load_s"] == 0  # served by the warm worker, after the first job
    assert outputs(cwd / "first") == outputs(cwd / "second") == reference["outputs"]


def test_a_lora_file_rewritten_between_commands_is_applied_again(warm_env, tmp_path):
    from pipelines.demo.qwen_image_tiny import build_tiny_lora

    env, folder = warm_env
    cwd, lora = tmp_path / "work", tmp_path / "lora.safetensors"
    build_tiny_lora(lora, seed=1)
    args = ("lora=file", f"lora.path={lora}", "tracking=none")
    job(env, cwd, "before", "keep_warm=15m", *args)
    newer = build_tiny_lora(tmp_path / "newer.safetensors", seed=2).read_bytes()
    rewrite_keeping_size_and_mtime(lora, newer)  # other weights, in place, the same size and mtime (`cp -p`)
    after, job_dir = job(env, cwd, "after", "keep_warm=15m", *args)
    assert "its file changed since it was applied: applying it again" in after.stdout + after.stderr
    assert the_worker(folder)["jobs"] == 2 and record(job_dir)["metrics"]["load_s"] == 0  # the weights kept
    _, cold = job(env, cwd, "cold", *args)  # no keep_warm: the new file applied in a fresh process
    assert outputs(job_dir) == outputs(cold)
    assert outputs(job_dir)[0] != outputs(cwd / "before")[0]


def test_checkpoint_files_rewritten_between_commands_are_loaded_again(warm_env, tmp_path):
    from pipelines.demo.qwen_image_tiny import build_tiny_repo

    env, folder = warm_env
    models, cwd = tmp_path / "models", tmp_path / "work"
    repo = build_tiny_repo(models / "tiny" / "Qwen-Image-Tiny")  # this test's own copy: it is rewritten
    env = dict(env, DIFFSYNTH_MODEL_BASE_PATH=str(models))
    job(env, cwd, "before", "keep_warm=15m", "tracking=none")
    worker = the_worker(folder)
    other = build_tiny_repo(tmp_path / "other", seed=1)  # same shapes, other weights
    for shard in (other / "transformer").glob("*.safetensors"):  # in place, the same size and mtime (`cp -p`)
        rewrite_keeping_size_and_mtime(repo / "transformer" / shard.name, shard.read_bytes())
    after, job_dir = job(env, cwd, "after", "keep_warm=15m", "tracking=none")
    assert "the checkpoint's files changed since they were loaded: loading them again" in after.stdout + after.stderr
    assert the_worker(folder)["pid"] == worker["pid"] and record(job_dir)["metrics"]["load_s"] > 0
    _, cold = job(env, cwd, "cold", "tracking=none")  # no keep_warm: the new files loaded in a fresh process
    assert outputs(job_dir) == outputs(cold)
    assert outputs(job_dir)[0] != outputs(cwd / "before")[0]


def test_a_folder_open_to_other_users_is_not_used(warm_env, tmp_path):
    env, folder = warm_env
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # whatever the umask
    proc, job_dir = job(env, tmp_path / "work", "here", "keep_warm=15m", "tracking=none")
    text = proc.stdout + proc.stderr
    assert "Warm worker not used" in text and "is open to other users" in text and f"chmod 700 {folder}" in text
    assert (job_dir / "image.png").exists() and record(job_dir)["metrics"]["load_s"] > 0
    assert list(folder.iterdir()) == []  # no socket, no worker


def test_keep_warm_takes_durations_and_refuses_anything_else():
    from runner.config.checks import keep_warm_seconds
    from runner.errors import ConfigError

    assert [keep_warm_seconds(v) for v in ("90s", "15m", "1h30m", "1.5h", "1d", "0", None)] == \
        [90, 900, 5400, 5400, 86400, 0, None]
    for bad in ("15", "15 minutes", "-1m", "m"):
        with pytest.raises(ConfigError, match="keep_warm.*is not a duration.*keep_warm=15m"):
            keep_warm_seconds(bad)
    assert keep_warm_seconds("365d") == keep_warm_seconds("8760h") == 365 * 86400  # the maximum
    for long in ("99999999999d", "365d1s", "1" + "0" * 400 + "s"):
        with pytest.raises(ConfigError, match="keep_warm.* is longer than the maximum, 365d. Fix: give at most "
                                              "keep_warm=365d"):
            keep_warm_seconds(long)


@pytest.mark.parametrize("idle", ["365d", "far beyond"])
def test_a_worker_waits_for_commands_whatever_its_idle_time(tmp_path, idle):
    """The worker's accept loop with keep_warm's maximum, and with an idle time beyond what
    any timeout can hold: it serves a command (its hello) and stops when asked."""
    import socket
    import threading

    from runner.config.checks import keep_warm_seconds

    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    worker = Worker(folder, "0" * 64, keep_warm_seconds(idle) if idle != "far beyond" else 1e30, {})
    listener = worker.listen()
    hellos = []

    def command() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(worker.path("sock")))
            hellos.append(Channel(sock).read(timeout=60))
            worker.stopping = True

    thread = threading.Thread(target=command, daemon=True)
    thread.start()
    try:
        worker.loop(listener)
    finally:
        listener.close()
        thread.join(timeout=60)
    assert [kind for kind, _ in hellos] == ["hello"]
