"""What the runner reads from and deletes in folders: `sync`, `report` and `cleanup` treat a
folder as something someone else may have written (every record checked, nothing outside it
read, no store taken from it), output folders are claimed atomically, and only the runner's own
leftovers are ever deleted.

Folders are made the way the runner makes them (`save_png`, `JobRecord.write`, `write_table`),
then edited the way a hostile sender would; the commands run as `python -m runner ...` against
real SQLite MLflow stores.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from runner.records import JobRecord, SweepRecord, save_png, write_table

from .processes import runner_env

SECRET = "SECRET-7f3a-never-leaves"
GEN = {"prompt": "a fox", "negative_prompt": "", "seed": 0, "steps": 1, "cfg_scale": 1.0, "width": 32,
       "height": 32, "model": "m", "loras": []}


def runner(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=runner_env(cwd / "models"),
                          capture_output=True, text=True, timeout=300)


def dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def secret_files(root: Path) -> tuple[Path, Path]:
    """A private key and a picture of the user's, outside any sweep folder."""
    home = root / "home"
    home.mkdir()
    key = home / "id_rsa"
    key.write_text(f"-----BEGIN KEY----- {SECRET} -----END KEY-----")
    picture = save_png(Image.new("RGB", (32, 32), (250, 0, 250)), home / "private.png", GEN | {"prompt": SECRET})
    return key, picture


def make_job(folder: Path, num: int, **fields) -> JobRecord:
    image = save_png(Image.new("RGB", (32, 32), (40 * num, 90, 160)), folder / "image.png", GEN | {"seed": num})
    record = JobRecord(num, [f"seed={num}"], status="FINISHED", job_dir=str(folder), image_path=str(image),
                       name=f"seed={num}", params={"seed": num}, metrics={"total_s": 1.0}, started=1.7e9,
                       ended=1.7e9 + 1, experiment="crafted", tracking={"backend": "mlflow", "store_dir": "x"})
    for key, value in fields.items():
        setattr(record, key, value)
    record.write(folder / "job.json")
    return record


def make_sweep(root: Path, jobs: int = 2, **tracking) -> Path:
    sweep = root / "sweep"
    records = [make_job(sweep / str(n), n) for n in range(jobs)]
    SweepRecord(sweep_dir=str(sweep), overrides=[f"seed={','.join(map(str, range(jobs)))}"], name="sweep",
                status="FINISHED", experiment="crafted", jobs=jobs, started=1.7e9, ended=1.7e9 + 9,
                tracking=tracking or {"backend": "mlflow", "store_dir": "x"}).write(sweep / "sweep.json")
    write_table(records, sweep / "jobs.csv")
    return sweep


def edit_job(sweep: Path, num: int, **fields) -> None:
    """Change job.json as someone else could have (the file is plain JSON)."""
    path = sweep / str(num) / "job.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def files_hold(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


# ----------------------------------------------------------------- 21.1: sync


def test_sync_reads_no_file_outside_the_folder_and_uses_only_the_stores_it_is_given(tmp_path):
    """A job.json naming the user's key as an input picture and another store, a sweep.json naming
    that store too: the sync goes to the store of the command line, reads no file outside the
    folder (the input's sha256 only) and the other store receives nothing."""
    from mlflow import MlflowClient

    key, _ = secret_files(tmp_path)
    other = tmp_path / "attacker"
    sweep = make_sweep(tmp_path, uri=f"sqlite:///{other / 'mlflow.db'}", store_dir=str(other), backend="mlflow",
                       artifact_location=(other / "art").as_uri())
    edit_job(sweep, 0, inputs=[{"arg": "edit_image", "index": 0, "path": str(key), "sha256": "ab" * 32}],
             tracking={"backend": "mlflow", "uri": f"sqlite:///{other / 'mlflow.db'}", "image_key": "../../x"})
    proc = runner(tmp_path, "sync", str(sweep))  # no store given: the config's default, not the folder's
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert not other.exists()  # the store the folder named received nothing
    store = tmp_path / "outputs" / "mlflow"
    assert files_hold(store, SECRET) == []  # the key's bytes are in no artifact
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("crafted").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert f"sync: logging into experiment 'crafted' of sqlite:///{store.resolve() / 'mlflow.db'} (from the config " \
           "defaults" in text
    assert f"the folder's records name the store 'sqlite:///{other / 'mlflow.db'}': not used" in text
    assert f"the input picture {key} lies outside the folder: not read, only its sha256 is logged" in text


@pytest.mark.parametrize("how", ["absolute path", "link out", "grid link"])
def test_sync_refuses_a_folder_whose_image_lies_outside_it(tmp_path, how):
    _, picture = secret_files(tmp_path)
    sweep = make_sweep(tmp_path)
    if how == "absolute path":
        edit_job(sweep, 1, image_path=str(picture))
    elif how == "link out":  # image_path names the job's own image.png, which is a link to the user's picture
        (sweep / "1" / "image.png").unlink()
        (sweep / "1" / "image.png").symlink_to(picture)
    else:  # the sweep's grid, which sync puts on the parent run
        (sweep / "grid.png").symlink_to(picture)
    store = tmp_path / "store"
    proc = runner(tmp_path, "sync", str(sweep), f"tracking.store_dir={store}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if "ERROR" in x]
    said = "sync: grid.png leads to" if how == "grid link" else "sync: 1/job.json: image_path names"
    assert said in line and f"{picture}" in line and "refused" in line
    assert "outside the" in line and "Fix:" in line and "Traceback" not in proc.stderr
    assert not store.exists()  # refused before any store was opened: nothing logged


def test_sync_refuses_a_folder_whose_image_is_a_decompression_bomb(tmp_path, caplog):
    """An image.png that declares 900 million pixels (a few dozen bytes) is read by the library's
    one reader: refused before any store opens, naming the file and the limit; no traceback."""
    from runner.tracking.sync import sync_main
    from tests.support.pictures import png_declaring

    sweep = make_sweep(tmp_path)
    (sweep / "1" / "image.png").write_bytes(png_declaring(30000, 30000))
    store = tmp_path / "store"
    with caplog.at_level(logging.INFO, logger="runner"):
        assert sync_main([str(sweep), f"tracking.store_dir={store}"]) == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "1/job.json: image_path" in line and "30000x30000" in line and "DIFFSYNTH_MAX_IMAGE_PIXELS" in line
    assert "refused, nothing logged" in line and "Fix:" in line
    assert not store.exists()


def test_a_sync_that_fails_mid_job_leaves_no_run_running_and_the_next_one_completes_it(tmp_path, monkeypatch):
    """The store fails while a job's run is logged (fault injected in MLflow's client): the run is
    ended FAILED, not left RUNNING (which the next sync would refuse as someone else's); the next
    sync completes that same run."""
    import mlflow

    from runner.tracking.sync import sync_main

    sweep = make_sweep(tmp_path)
    store = tmp_path / "store"
    real = mlflow.tracking.MlflowClient.log_batch
    failed = []

    def fail_once(self, *args, **kwargs):
        if not failed:
            failed.append(True)
            raise mlflow.exceptions.MlflowException("injected: the store failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_batch", fail_once)
    assert sync_main([str(sweep), f"tracking.store_dir={store}"]) == 1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "crafted"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}  # the parent and job 0's run
    assert sync_main([str(sweep), f"tracking.store_dir={store}"]) == 0
    after = client.search_runs([experiment.experiment_id])
    assert len(after) == 3 and {r.info.status for r in after} == {"FINISHED"}
    assert {r.info.run_id for r in runs} <= {r.info.run_id for r in after}  # completed, not logged twice


@pytest.mark.parametrize("edit, key", [
    ("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ({"metrics": {"total_s": "fast"}}, '`metrics.total_s` is "fast", not a number'),
    ({"num": None}, "`num` is null, not an integer"),
    ({"inputs": [{"arg": "edit_image", "index": 0, "path": 5, "sha256": "ab"}]}, "`inputs[0].path` is 5, not a string"),
    ({"status": "DONE"}, '`status` is "DONE", not one of RUNNING'),
    ("drop num", "`num` is missing"),
])
def test_sync_of_a_malformed_record_names_the_file_and_the_key(tmp_path, caplog, edit, key):
    from runner.tracking.sync import sync_main

    sweep = make_sweep(tmp_path)
    path = sweep / "1" / "job.json"
    data = json.loads(path.read_text())
    if edit == "drop num":
        del data["num"]
    if isinstance(edit, dict):
        data |= edit
    path.write_text(edit if isinstance(edit, str) and edit != "drop num" else json.dumps(data))
    with caplog.at_level(logging.INFO, logger="runner"):
        assert sync_main([str(sweep), f"tracking.store_dir={tmp_path / 'store'}"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(f"sync: {path}: ") and key in error and "Fix:" in error, error
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------- 21.1: report


def test_report_never_reads_a_picture_outside_the_sweep_folder(tmp_path):
    """jobs.csv naming the user's picture by absolute path, by `../`, and a job's image.png that is
    a link to it: report.html shows none of them (their pictures carry SECRET as their prompt,
    which the page would show) and the command says so."""
    _, picture = secret_files(tmp_path)
    sweep = make_sweep(tmp_path, jobs=3)
    for n in (0, 1, 2):
        (sweep / str(n) / "image.png").unlink()
    (sweep / "2" / "image.png").symlink_to(picture)
    table = (sweep / "jobs.csv").read_text().splitlines()
    table[1] = table[1].replace("0/image.png", str(picture))
    table[2] = table[2].replace("1/image.png", "../home/private.png")
    (sweep / "jobs.csv").write_text("\n".join(table) + "\n")
    proc = runner(tmp_path, "report", str(sweep))
    assert proc.returncode == 0, proc.stderr
    text = Path(proc.stdout.split()[-1]).read_text(encoding="utf-8")  # the page it printed
    assert SECRET not in text and 'class="thumb"' not in text and "data:image/jpeg" not in text
    assert "names 3 picture(s) outside the sweep folder" in proc.stderr and "not read" in proc.stderr


@pytest.mark.parametrize("damage", ["missing", "not UTF-8"])
def test_report_rebuilds_from_the_job_folders_without_a_readable_jobs_csv(tmp_path, capsys, damage):
    from runner.commands import report_main

    sweep = make_sweep(tmp_path, jobs=3)
    if damage == "missing":  # a full disk at the sweep's end
        (sweep / "jobs.csv").unlink()
    else:
        (sweep / "jobs.csv").write_bytes(b"job,status\n0,FINISHED \xff\xfe\n")
    assert report_main([str(sweep), "thumb=32"]) == 0
    err = capsys.readouterr().err
    assert "rebuilt from the" in err and "job.json" in err and str(sweep / "jobs.csv") in err
    [page] = sweep.glob("report_*.html")
    assert page.read_text(encoding="utf-8").count('class="thumb"') == 3


def test_report_resolves_no_interpolation_a_folder_holds(tmp_path, capsys, monkeypatch):
    """A multirun.yaml whose overrides hold `${oc.env:...}`: the page shows the text as written,
    never this machine's value of the variable (report.html is shared and uploaded)."""
    from runner.commands import report_main

    monkeypatch.setenv("RUNNER_TEST_SECRET", SECRET)
    sweep = make_sweep(tmp_path, jobs=2)
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - prompt=${oc.env:RUNNER_TEST_SECRET}\n    - seed=0,1\n")
    assert report_main([str(sweep), "thumb=32"]) == 0
    [page] = sweep.glob("report_*.html")
    text = page.read_text(encoding="utf-8")
    assert "oc.env:RUNNER_TEST_SECRET" in text and SECRET not in text


# -------------------------------------------------------- 21.2 / 25.B2: folders


def _claim_in_turns(root: str, trials: int, barrier, results) -> None:
    from runner import files

    got = []
    for trial in range(trials):
        barrier.wait()  # every process asks for the same new folder at the same moment
        got.append(files.claim_dir(f"{root}/{trial}/same-second"))
    results.put(got)


def test_processes_released_together_never_get_the_same_folder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    processes, trials = 6, 1000
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_claim_in_turns, args=(str(tmp_path), trials, barrier, results))
               for _ in range(processes)]
    for w in workers:
        w.start()
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join()
    shared = [trial for trial in range(trials) if len({g[trial] for g in got}) < processes]
    assert shared == [], f"{len(shared)} of {trials} trials gave two processes the same folder"


def test_cleanup_removes_only_the_runners_own_leftovers(tmp_path):
    """cleanup --dir: the leftovers of the runner's interrupted writes in its own folders go; a
    user's temporary files, and temp-looking files in folders that are not the runner's, stay."""
    from runner.files import temp_path

    pid = dead_pid()
    mine = tmp_path / "mine"
    sweep = make_sweep(mine)
    store = tmp_path / "store"
    ours = [temp_path(sweep / "1" / "image.png", pid), temp_path(sweep / "jobs.csv", pid),
            temp_path(sweep / "2" / "image.png", pid),  # a job killed in its first write: no job.json yet
            temp_path(store / "fingerprints.json", pid)]
    theirs = [sweep / f".notes.txt.tmp{pid}", mine / f".thesis.tex.tmp{pid}", mine / ".thesis.tex.tmp3999999",
              mine / "thesis" / f".thesis.tex.runner-tmp{pid}", temp_path(sweep / "0" / "job.json", os.getpid())]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    proc = runner(tmp_path, "cleanup", "--dir", str(mine), f"tracking.store_dir={store}", "experiment=e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p for p in ours if p.exists()] == [] and [p for p in theirs if not p.exists()] == []
    assert f"cleanup: experiment 'e' of sqlite:///{store.resolve() / 'mlflow.db'} (from the command line)" in \
        proc.stderr
    assert all(f"Removed {p}" in proc.stderr for p in ours)
