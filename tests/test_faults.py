"""Fault injection against `python -m runner`: subprocesses on the embedded tiny model, real
SQLite stores, a real `mlflow server` on 127.0.0.1, real signals, a real full or read-only file
system (a tmpfs in a private mount namespace, `unshare`). Every failure a user can cause ends
in an error that says what, where and how to fix it, and loses nothing: no half-written file,
no run left RUNNING, no image lost to a tracking failure.

Faults are timed by events (the runner's hold points, runner/failpoints.py; runs appearing in
the store), never by sleeps or speed; no test asserts a time.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import runner_env, start_mlflow

SMALL = ["model=qwen_image_tiny", "sampler=tiny", "sampler.height=64", "sampler.width=64", "sampler.steps=2",
         "progress_bar=false", "prompt=a red fox in the snow", "device=cpu"]
TERMINAL = {"FINISHED", "FAILED", "KILLED"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pipelines.demo.qwen_image_tiny import build_tiny_repo

    root = tmp_path_factory.mktemp("runner_faults")
    models = root / "models"
    build_tiny_repo(models / "tiny" / "Qwen-Image-Tiny")
    return {"root": root, "env": runner_env(models)}


def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner", *args]


def run(env, cwd: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv(*args), cwd=cwd, env=dict(env["env"], **extra), capture_output=True, text=True,
                          timeout=timeout)


def start(env, cwd: Path, *args: str, holds: Path | None = None, hold: str = "") -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    e = dict(env["env"])
    if holds is not None:
        holds.mkdir(parents=True, exist_ok=True)
        e.update(RUNNER_HOLD=hold, RUNNER_HOLD_DIR=str(holds))
    return subprocess.Popen(argv(*args), cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(check, proc: subprocess.Popen | None = None, what: str = "", timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert proc is None or proc.poll() is None, f"the process ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def release(holds: Path, name: str) -> None:
    (holds / f"{name}.go").write_text("")


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def client(uri_or_store):
    """A client of the store a runner under test may be creating at this moment: MLflow's own
    creation of a SQLite store is not safe against another process doing it too, so this takes
    the lock runners take for it (runner.tracking.store.store_lock)."""
    from mlflow import MlflowClient

    from runner.tracking.store import store_lock

    uri = uri_or_store if isinstance(uri_or_store, str) else f"sqlite:///{uri_or_store / 'mlflow.db'}"
    with store_lock(uri):
        return MlflowClient(uri)


def runs_of(c, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"],
                                                max_results=1000)


def split(runs):
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    children = sorted((r for r in runs if r.data.tags.get("runner.kind") == "job"),
                      key=lambda r: (r.info.start_time, int(r.data.tags["runner.job_num"])))
    return parents, children


def error_lines(text: str) -> list[str]:
    """The runner's error messages: each says what, where, and after `Fix:` how to fix it."""
    return [line for line in text.splitlines() if "Fix:" in line]


def output(proc, out: str | None = None, err: str | None = None) -> str:
    """Everything the runner wrote (its log goes to stdout, Python's last-resort log to stderr);
    `out`/`err` as `finish` returned them for a Popen."""
    return (proc.stdout if out is None else out) + (proc.stderr if err is None else err)


def assert_exit(proc, code: int, out: str | None = None, err: str | None = None) -> str:
    text = output(proc, out, err)
    assert proc.returncode == code, f"exit {proc.returncode}\n{text[-8000:]}"
    assert "Traceback" not in text, text[-8000:]
    return text


# ------------------------------------------------------------------ 1. folders


def test_two_sweeps_started_together_never_share_a_folder(env, tmp_path):
    """Both name the same folder (as two sweeps started in the same second do): one gets it,
    the other `<name>-2`; on a fresh store, whose creation they race, both log every job."""
    store = tmp_path / "store"
    common = [*SMALL, f"tracking.store_dir={store}", "experiment=together",
              "hydra.sweep.dir=${unique_dir:outputs/multirun/same-second}"]
    procs = [start(env, tmp_path, "-m", *common, f"seed={a},{b}") for a, b in ((0, 1), (2, 3))]
    outputs = [finish(p) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert_exit(proc, 0, out, err)
    folders = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert [f.name for f in folders] == ["same-second", "same-second-2"]
    seeds = set()
    for folder in folders:
        rows = list(csv.DictReader(open(folder / "jobs.csv")))
        assert [r["status"] for r in rows] == ["FINISHED", "FINISHED"]
        seeds |= {r["seed"] for r in rows}
        assert all((folder / r["job"] / "image.png").is_file() for r in rows)
        assert (folder / "report.html").is_file() and json.loads((folder / "sweep.json").read_text())[
            "status"] == "FINISHED"
    assert seeds == {"0", "1", "2", "3"}  # each folder holds its own sweep's jobs
    parents, children = split(runs_of(client(store), "together"))
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    for parent in parents:
        mine = [ch for ch in children if ch.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(mine) == 2 and all(ch.info.status == "FINISHED" for ch in mine)


def test_two_sweeps_given_the_same_folder_at_once_one_runs_the_other_touches_nothing(env, tmp_path):
    """Both find the folder free (each held just before claiming it), then are released
    together: exactly one claims it and runs; the other exits 2 naming the folder and the fix,
    having written nothing there (the winner's job.json matches its image)."""
    store, sweep = tmp_path / "store", tmp_path / "same"
    holds = [tmp_path / "holds_a", tmp_path / "holds_b"]
    procs = [start(env, tmp_path, "-m", *SMALL, f"seed={seed}", f"tracking.store_dir={store}", "experiment=same",
                   f"hydra.sweep.dir={sweep}", holds=h, hold="claim") for seed, h in ((0, holds[0]), (10, holds[1]))]
    for proc, h in zip(procs, holds):
        wait_until(lambda h=h: (h / "claim.held").exists(), proc, "the claim")
    for h in holds:  # released together
        release(h, "claim")
    outputs = [finish(p) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [output(p, *o)[-3000:] for p, o in zip(procs, outputs)]
    [(winner, won)] = [(p, o) for p, o in zip(procs, outputs) if p.returncode == 0]
    [(loser, lost)] = [(p, o) for p, o in zip(procs, outputs) if p.returncode == 2]
    [line] = error_lines(assert_exit(loser, 2, *lost))
    assert "config `hydra.sweep.dir`" in line and str(sweep) in line and "claimed at the same moment" in line
    seed = 0 if winner is procs[0] else 10
    from runner.records import read_generation

    record = json.loads((sweep / "0" / "job.json").read_text())
    assert record["status"] == "FINISHED" and record["params"]["seed"] == seed
    assert read_generation(sweep / "0" / "image.png")["seed"] == seed
    assert f"seed={seed}" in json.loads((sweep / "sweep.json").read_text())["overrides"]
    assert [r["seed"] for r in csv.DictReader(open(sweep / "jobs.csv"))] == [str(seed)]
    assert sorted(p.name for p in sweep.iterdir()) == [".runner-claim", "0", "grid.png", "jobs.csv",
                                                       "multirun.yaml", "report.html", "sweep.json"]
    parents, children = split(runs_of(client(store), "same"))
    assert len(parents) == 1 and [ch.data.params["seed"] for ch in children] == [str(seed)]


# --------------------------------------------------------- 2 and 6. refused early


def test_a_non_finite_value_in_any_job_refuses_the_sweep_before_the_first(env, tmp_path):
    store = tmp_path / "store"
    proc = run(env, tmp_path, "-m", *SMALL, "seed=0,1", "sampler.cfg_scale=4,nan", f"tracking.store_dir={store}",
               "experiment=nan")
    text = assert_exit(proc, 2)
    [line] = error_lines(text)
    assert "job 1 [seed=0 sampler.cfg_scale=nan]" in line and "config `sampler.cfg_scale`" in line
    assert "Loading" not in text  # no weight was read
    assert not any((tmp_path / "outputs" / "multirun").glob("*/*"))  # no sweep or job folder
    assert runs_of(client(store), "nan") == []  # no MLflow run


def _deleted_experiment(store: Path) -> list[str]:
    c = client(store)
    c.delete_experiment(c.create_experiment("deleted"))
    return ["experiment=deleted"]


@pytest.mark.parametrize("case,key", [
    ("device=cuda", "device"),
    ("seed=-1", "seed"),
    ("tracking.uri=ftp://127.0.0.1/store", "tracking.uri"),
    ("deleted experiment", "experiment"),
    ("sampler.steps=many", "sampler.steps"),
])
def test_config_errors_are_refused_before_anything_with_no_run(env, tmp_path, case, key):
    import torch

    if case == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    store = tmp_path / "store"
    overrides = _deleted_experiment(store) if case == "deleted experiment" else [case, "experiment=refused"]
    before = {r.info.run_id for e in client(store).search_experiments(view_type=3)
              for r in client(store).search_runs([e.experiment_id], run_view_type=3)}
    proc = run(env, tmp_path, *SMALL, *overrides, f"tracking.store_dir={store}", f"hydra.run.dir={tmp_path}/run")
    text = assert_exit(proc, 2)
    [line] = error_lines(text)
    assert f"config `{key}`" in line
    if case == "deleted experiment":
        assert "mlflow experiments restore --experiment-id" in text
    if case == "device=cuda":
        assert "CUDA is not available" in text and "AttributeError" not in text
    assert "Loading" not in text and not (tmp_path / "run").exists()
    after = {r.info.run_id for e in client(store).search_experiments(view_type=3)
             for r in client(store).search_runs([e.experiment_id], run_view_type=3)}
    assert after == before  # no MLflow run


# ------------------------------------------------------------ 3. tracking dies


def _start_server(env, folder: Path) -> tuple[subprocess.Popen, str]:
    folder.mkdir(parents=True, exist_ok=True)
    return start_mlflow("server", ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                                   "--artifacts-destination", str(folder / "art")], folder, env["env"])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_a_dead_tracking_server_costs_no_image_and_sync_logs_the_sweep_later(env, tmp_path):
    server, url = _start_server(env, tmp_path / "server")
    holds, sweep = tmp_path / "holds", tmp_path / "sweep"
    try:
        proc = start(env, tmp_path, "-m", *SMALL, "seed=0,1,2,3", f"tracking.uri={url}", "experiment=dies",
                     f"hydra.sweep.dir={sweep}", holds=holds, hold="job2")
        wait_until(lambda: (holds / "job2.held").exists(), proc, "job 2")
        c = client(url)
        wait_until(lambda: sum(ch.info.status == "FINISHED" for ch in split(runs_of(c, "dies"))[1]) == 2, proc,
                   "jobs 0 and 1 FINISHED on the server")
    finally:
        _kill_group(server)  # the server dies mid-sweep
    release(holds, "job2")
    out, err = finish(proc)
    text = assert_exit(proc, 3, out, err)  # every image made, some jobs not tracked
    rows = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert [(r["status"], r["tracked"]) for r in rows] == [("FINISHED", "yes")] * 2 + [("FINISHED", "no")] * 2
    for n in range(4):
        from runner.records import read_generation

        assert read_generation(sweep / str(n) / "image.png")["seed"] == n  # the image with its metadata
    assert [json.loads((sweep / str(n) / "job.json").read_text())["tracked"] for n in range(4)] == [
        True, True, False, False]
    assert "2 job(s) not tracked" in text and f"python -m runner sync {sweep}" in text
    assert text.count("cannot be reached") == 1  # known dead once: no later job waited for it

    store = tmp_path / "new_store"
    first = run(env, tmp_path, "sync", str(sweep), f"tracking.store_dir={store}")
    assert_exit(first, 0)
    assert "5 run(s) logged, 0 already" in first.stderr
    parents, children = split(runs_of(client(store), "dies"))
    [parent] = parents
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {ch.data.params["seed"] for ch in children} == {"0", "1", "2", "3"}
    for ch in children:
        assert ch.info.status == "FINISHED" and ch.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert ch.data.tags["runner.synced_from"] == str(sweep) and ch.data.metrics["total_s"] > 0
        assert {"image.png", "config.yaml", "images"} <= {a.path for a in client(store).list_artifacts(
            ch.info.run_id)}
    assert {"grid.png", "report.html", "jobs.csv"} <= {a.path for a in client(store).list_artifacts(
        parent.info.run_id)}
    again = run(env, tmp_path, "sync", str(sweep), f"tracking.store_dir={store}")
    assert_exit(again, 0)
    assert "0 run(s) logged, 5 already" in again.stderr
    assert len(runs_of(client(store), "dies")) == 5  # nothing logged twice


# ------------------------------------------------------- 3. full or read-only disk


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs tmpfs "$d"'],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -Urm` to mount a private tmpfs")


def _in_namespace(env, cwd: Path, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`script` in a private user+mount namespace, where it may mount a tmpfs on ./outputs."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "outputs").mkdir(exist_ok=True)
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=cwd, env=env["env"], capture_output=True,
                          text=True, timeout=timeout)


@needs_mounts
def test_a_full_disk_stops_the_sweep_with_one_clear_line(env, tmp_path):
    store, holds = tmp_path / "store", tmp_path / "holds"
    holds.mkdir()
    runner = " ".join(argv("-m", *[f"'{a}'" for a in SMALL], "seed=0,1,2", f"tracking.store_dir={store}",
                           "experiment=full"))
    script = f"""
mount -t tmpfs -o size=1m tmpfs outputs || exit 90
RUNNER_HOLD=job1 RUNNER_HOLD_DIR={holds} {runner} &
pid=$!
while [ ! -e {holds}/job1.held ]; do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
dd if=/dev/zero of=outputs/fill bs=4k count=1000 2>/dev/null   # job 1 finds the disk full
touch {holds}/job1.go
wait $pid
echo "exit=$?"
find outputs -type f | sort
"""
    proc = _in_namespace(env, tmp_path, script)
    out, text = proc.stdout, output(proc)
    assert "exit=1" in out and "Traceback" not in text, text[-8000:]
    [line] = error_lines(text)
    assert "job 1: cannot write" in line and "1/image.png" in line and "No space left on device" in line
    assert "Fix: free space" in line and "resume=true" in line
    files = [f for f in out.splitlines() if f.startswith("outputs/multirun")]
    assert any(f.endswith("/0/image.png") for f in files) and not any(f.endswith("/1/image.png") for f in files)
    assert not [f for f in files if ".tmp" in f]  # no half-written file
    runs = runs_of(client(store), "full")
    assert all(r.info.status in TERMINAL for r in runs)  # nothing left RUNNING
    parents, children = split(runs)
    assert parents[0].info.status == "FAILED" and [ch.info.status for ch in children] == ["FINISHED", "FAILED"]
    assert "No space left on device" in children[1].data.tags["runner.error"]


@needs_mounts
@pytest.mark.parametrize("sweep", [False, True])
def test_a_read_only_outputs_folder_is_one_clear_error(env, tmp_path, sweep):
    store = tmp_path / "store"
    args = ["-m", *SMALL, "seed=0,1"] if sweep else [*SMALL]
    runner = " ".join(argv(*[f"'{a}'" for a in args], f"tracking.store_dir={store}", "experiment=readonly"))
    proc = _in_namespace(env, tmp_path, f"mount -t tmpfs -o ro tmpfs outputs || exit 90\n{runner}\necho exit=$?")
    text = output(proc)
    assert "exit=1" in proc.stdout and "Traceback" not in text, text[-8000:]
    [line] = error_lines(text)
    assert "cannot create the output folder" in line and "Read-only file system" in line and "Fix: make" in line
    assert runs_of(client(store), "readonly") == []  # no MLflow run


# --------------------------------------------------------------- 4. dead runs


def test_kill_9_mid_job_then_resume_ends_the_dead_runs_and_finishes(env, tmp_path):
    store, holds, sweep = tmp_path / "store", tmp_path / "holds", tmp_path / "sweep"
    common = [*SMALL, "seed=0,1,2,3", f"tracking.store_dir={store}", "experiment=k9"]
    proc = start(env, tmp_path, "-m", *common, f"hydra.sweep.dir={sweep}", holds=holds, hold="job2")
    c = client(store)

    def job2_running():
        parents, children = split(runs_of(c, "k9"))
        states = {ch.data.tags["runner.job_num"]: ch.info.status for ch in children}
        return states == {"0": "FINISHED", "1": "FINISHED", "2": "RUNNING"}

    wait_until(lambda: (holds / "job2.held").exists(), proc, "job 2")
    wait_until(job2_running, proc, "job 2's run in the store")
    proc.kill()  # SIGKILL: nothing of the runner gets to clean up
    finish(proc)
    from runner.files import temp_path

    leftover = temp_path(sweep / "2" / "image.png", proc.pid)  # as an interrupted write leaves it
    lookalike = sweep / "2" / f".image.png.tmp{proc.pid}"
    for path in (leftover, lookalike):
        path.write_bytes(b"\x89PNG half")
    runs = runs_of(c, "k9")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "RUNNING", "RUNNING"]

    resumed = run(env, tmp_path, "-m", *common, "resume=true", f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    text = assert_exit(resumed, 0)
    assert text.count("as KILLED: its process") == 2
    assert leftover.exists() and lookalike.exists()  # the dead runs' tags name the folder: they choose nothing
    assert f"Not searched for leftovers of interrupted writes: {sweep}" in text and f"--dir {sweep}" in text
    parents, children = split(runs_of(c, "k9"))
    assert [p.info.status for p in parents] == ["KILLED", "FINISHED"]
    first = [ch for ch in children if ch.data.tags["mlflow.parentRunId"] == parents[0].info.run_id]
    assert {ch.data.tags["runner.job_num"]: ch.info.status for ch in first} == {
        "0": "FINISHED", "1": "FINISHED", "2": "KILLED"}
    second = [ch for ch in children if ch.data.tags["mlflow.parentRunId"] == parents[1].info.run_id]
    assert sorted(ch.data.params["seed"] for ch in second) == ["2", "3"]  # 0 and 1 skipped
    assert all(ch.info.status == "FINISHED" for ch in second)
    assert all(r.info.status in TERMINAL for r in runs_of(c, "k9"))


def test_cleanup_ends_runs_of_dead_processes_here_and_leaves_other_hosts(env, tmp_path):
    from runner.owner import owner_tags

    store = tmp_path / "store"
    c = client(store)
    exp = c.create_experiment("cleanup", artifact_location=(store / "artifacts" / "cleanup").as_uri())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = gone.stdout.strip()
    folder = tmp_path / "elsewhere" / "0"  # a folder the dead run's tags name: nothing in it is deleted
    folder.mkdir(parents=True)
    leftovers = [folder / f".job.json.tmp{dead_pid}", folder / f".thesis.tex.runner-tmp{dead_pid}",
                 folder / f".notes.tmp{dead_pid}"]
    for leftover in leftovers:
        leftover.write_text("{")
    mine = owner_tags()
    dead = c.create_run(exp, run_name="dead", tags=mine | {"runner.owner.pid": dead_pid,
                                                           "runner.job_dir": str(folder)}).info.run_id
    other = c.create_run(exp, run_name="other", tags=mine | {"runner.owner.host": "elsewhere"}).info.run_id
    alive = c.create_run(exp, run_name="alive", tags=mine).info.run_id  # this test process: alive
    unknown = c.create_run(exp, run_name="unknown").info.run_id
    proc = run(env, tmp_path, "cleanup", f"tracking.store_dir={store}", "experiment=cleanup")
    assert_exit(proc, 0)
    status = {r.info.run_id: r.info.status for r in runs_of(c, "cleanup")}
    assert status == {dead: "KILLED", other: "RUNNING", alive: "RUNNING", unknown: "RUNNING"}
    assert "another host" in proc.stderr and "no owner tags" in proc.stderr and "still runs" in proc.stderr
    assert all(leftover.exists() for leftover in leftovers)  # a store's tags never choose what is deleted
    assert f"cleanup: experiment 'cleanup' of sqlite:///{store.resolve() / 'mlflow.db'} (from the command line)" \
        in proc.stderr
    assert f"Not searched for leftovers of interrupted writes: {folder}" in proc.stderr
    again = run(env, tmp_path, "cleanup", f"tracking.store_dir={store}", "experiment=cleanup")
    assert_exit(again, 0)
    assert "as KILLED" not in again.stderr


def test_a_second_ctrl_c_during_the_end_of_the_sweep_does_not_break_it(env, tmp_path):
    store, holds, sweep = tmp_path / "store", tmp_path / "holds", tmp_path / "sweep"
    proc = start(env, tmp_path, "-m", *SMALL, "seed=0,1,2", f"tracking.store_dir={store}", "experiment=twice",
                 f"hydra.sweep.dir={sweep}", holds=holds, hold="job1,sweep_end")
    wait_until(lambda: (holds / "job1.held").exists(), proc, "job 1")
    c = client(store)
    wait_until(lambda: [ch.info.status for ch in split(runs_of(c, "twice"))[1]] == ["FINISHED", "RUNNING"], proc,
               "job 0 logged")
    proc.send_signal(signal.SIGINT)  # Ctrl-C during job 1
    wait_until(lambda: (holds / "sweep_end.held").exists(), proc, "the end of the sweep")
    proc.send_signal(signal.SIGINT)  # and again, twice, while the sweep ends
    proc.send_signal(signal.SIGINT)
    release(holds, "sweep_end")
    out, err = finish(proc)
    text = assert_exit(proc, 130, out, err)
    assert "Interrupted again" in text
    rows = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert [r["status"] for r in rows] == ["FINISHED", "KILLED"]
    assert json.loads((sweep / "sweep.json").read_text())["status"] == "KILLED"
    runs = runs_of(client(store), "twice")
    assert all(r.info.status in TERMINAL for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    parents, children = split(runs)
    assert parents[0].info.status == "KILLED" and [ch.info.status for ch in children] == ["FINISHED", "KILLED"]


def test_a_sweep_whose_job_table_cannot_be_written_does_not_exit_0(env, tmp_path):
    store, holds, sweep = tmp_path / "store", tmp_path / "holds", tmp_path / "sweep"
    proc = start(env, tmp_path, "-m", *SMALL, "seed=0,1", f"tracking.store_dir={store}", "experiment=notable",
                 f"hydra.sweep.dir={sweep}", holds=holds, hold="sweep_end")
    wait_until(lambda: (holds / "sweep_end.held").exists(), proc, "the end of the sweep")
    (sweep / "jobs.csv").mkdir()  # the table's name is taken by a folder: it cannot be written
    release(holds, "sweep_end")
    out, err = finish(proc)
    [line] = error_lines(assert_exit(proc, 1, out, err))
    assert f"cannot write {sweep / 'jobs.csv'}" in line and "Fix:" in line
    assert (sweep / "grid.png").is_file() and (sweep / "report.html").is_file()
    [parent], children = split(runs_of(client(store), "notable"))
    assert parent.info.status == "FAILED" and [ch.info.status for ch in children] == ["FINISHED", "FINISHED"]


# ------------------------------------------------- 7. a user's mistake, never a traceback


@pytest.mark.parametrize("case,key", [
    ("call.input_image=5", "call.input_image"),  # a picture path YAML reads as a number
    ("sampler.steps=${nope}", "sampler.steps"),  # an interpolation that does not resolve
    ("call.tiled=${oc.env:RUNNER_TEST_UNSET}", "call.tiled"),
    ("hydra.run.dir=${nope}", "hydra.run.dir"),  # ... in a key Hydra resolves itself
    ("experiment=", "experiment"),  # MLflow refuses the name
    ("store is a file", "tracking.store_dir"),
    ("call.exponential_shift_mu=1e6", "call.exponential_shift_mu"),  # the library's checks of call values
    ("call.rand_device=bogus", "call.rand_device"),
    ("call.rand_device=cuda", "call.rand_device"),
])
def test_a_users_mistake_is_refused_before_loading_naming_the_key(env, tmp_path, case, key):
    import torch

    if case == "call.rand_device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    store = tmp_path / "store"
    if case == "store is a file":
        (tmp_path / "a-file").write_text("")
        store = tmp_path / "a-file"
    overrides = [] if case == "store is a file" else [case]
    proc = run(env, tmp_path, *SMALL, f"tracking.store_dir={store}", f"hydra.run.dir={tmp_path}/run", *overrides)
    text = assert_exit(proc, 2)  # no traceback
    [line] = error_lines(text)
    assert f"config `{key}`" in line, line
    assert "Loading" not in text and not (tmp_path / "run").exists()  # before any weight, no folder
    assert not store.is_dir() or runs_of(client(store), "qwen-image") == []  # no MLflow run


@pytest.fixture(scope="module")
def nan_lora(env) -> Path:
    """A demo LoRA with one NaN: the library refuses it (LoraError) once the job applies it."""
    from safetensors.torch import load_file, save_file

    from pipelines.demo.qwen_image_tiny import build_tiny_lora

    path = env["root"] / "nan.safetensors"
    build_tiny_lora(path)
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("sweep", [False, True])
def test_a_known_user_error_in_a_job_is_one_line_on_the_console_and_a_traceback_in_its_log(env, tmp_path, nan_lora,
                                                                                          sweep):
    folder = tmp_path / "out"
    args = (["-m", *SMALL, "seed=0,1", f"hydra.sweep.dir={folder}"] if sweep
            else [*SMALL, f"hydra.run.dir={folder}"])
    proc = run(env, tmp_path, *args, "lora=file", f"lora.path={nan_lora}", "tracking=none")
    text = assert_exit(proc, 1)  # the job failed; no traceback on the console
    assert text.count("FAILED: LoraError: ") == (2 if sweep else 1) and "holds NaN or infinite values" in text
    logs = sorted(folder.glob("0/*.log" if sweep else "*.log"))
    assert logs, sorted(folder.rglob("*"))
    log = logs[0].read_text()
    assert "Traceback (most recent call last)" in log and "LoraError" in log  # the job's log keeps it


@needs_mounts
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_a_read_only_or_full_store_is_one_line_naming_it_and_the_fix(env, tmp_path, fault):
    """A store that worked, then became read-only (its database file) or full: the job finishes,
    untracked (exit 3), with one line naming the store and the fix, no MLflow/SQLAlchemy traceback."""
    store = tmp_path / "store"
    runner = " ".join(argv(*[f"'{a}'" for a in SMALL], f"tracking.store_dir={store}"))
    spoil = (f"mount --bind {store}/mlflow.db {store}/mlflow.db && mount -o remount,bind,ro {store}/mlflow.db"
             if fault == "read-only" else f"dd if=/dev/zero of={store}/fill bs=64k 2>/dev/null; true")
    script = f"""
mkdir -p {store} && mount -t tmpfs -o size=8m tmpfs {store} || exit 90
{runner} experiment=first > first.txt 2>&1 || {{ cat first.txt; exit 91; }}
{spoil} || exit 92
{runner} experiment=second
echo "exit=$?"
"""
    proc = _in_namespace(env, tmp_path, script)
    text = output(proc)
    assert "exit=3" in proc.stdout and "Traceback" not in text, text[-8000:]
    [line] = [line for line in text.splitlines() if "Fix:" in line]
    problem = "cannot be written (read-only)" if fault == "read-only" else "is full"
    assert f"MLflow store {store} {problem}" in line and "python -m runner sync" in line, line
    assert text.count("SQLAlchemy") == 0
