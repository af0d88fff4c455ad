"""The folder of this user's warm workers and what it holds per worker (`<id>.sock`, `.lock`,
`.json`, `.log`, `.beat`): who is alive, who is frozen, which worker is a job's (its identity),
and stopping them. docs/warm.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ...build import pipeline as build
from ...owner import process_start
from ...records import FAILED, FINISHED, KILLED, JobRecord
from ...tracking.provenance import stat_key

logger = logging.getLogger("runner")

DIR_ENV = "RUNNER_WARM_DIR"
# environment variables that choose which files load or how the numbers come out
IDENTITY_ENV = ("DIFFSYNTH_", "HF_", "HUGGINGFACE_", "MODELSCOPE_", "TRANSFORMERS_", "CUDA_", "OMP_", "MKL_",
                "OPENBLAS_", "PYTORCH_", "TORCH_", "PYTHON")
BUSY_NOTICE_S = 2.0  # no hello within this: the worker serves another command; say so and wait
HEARTBEAT_S = 0.5  # the worker touches <id>.beat this often, idle or busy (a thread of its own)
FROZEN_ENV = "RUNNER_WARM_FROZEN_S"
FROZEN_S = 60.0  # no heartbeat for this long: the worker is frozen (stopped, hung); $RUNNER_WARM_FROZEN_S
STOP_WAIT_S = 60.0  # how long to wait for a stopped worker to exit
LOCK_WAIT_S = 30.0  # a new worker waits this long for the previous one's lock (it is exiting)


class WarmError(Exception):
    """The warm worker cannot be used; the message says why (the job then runs here)."""


def warm_dir(create: bool = True) -> Path:
    """This user's folder of warm workers, private (0700); WarmError if it is not."""
    if os.environ.get(DIR_ENV):
        folder = Path(os.environ[DIR_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        folder = Path(os.environ["XDG_RUNTIME_DIR"]) / "qwen-image-runner"
    else:
        folder = Path.home() / ".cache" / "qwen-image-runner" / "warm"
    folder = folder.absolute()
    if create:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
    check_private(folder)
    return folder


def check_private(folder: Path) -> None:
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise WarmError(f"{folder} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WarmError(f"{folder} is not a folder (a link?): remove it, or set {DIR_ENV} to a private folder")
    if st.st_uid != os.getuid():
        raise WarmError(f"{folder} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): remove it, "
                        f"or set {DIR_ENV} to a folder of yours")
    if st.st_mode & 0o077:
        raise WarmError(f"{folder} is open to other users (mode {stat.S_IMODE(st.st_mode):o}): `chmod 700 {folder}`")


def path_of(folder: Path, wid: str, ext: str) -> Path:
    return folder / f"{wid}.{ext}"


@contextlib.contextmanager
def flocked(path: Path, timeout: float, holder: str) -> Iterator[None]:
    """`path` flocked, waited for at most `timeout` seconds (saying so after BUSY_NOTICE_S);
    WarmError naming `holder` when it stays taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        started, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout:
                    raise WarmError(f"{holder} has held {path} for {waited:.0f} s") from None
                if not said and waited > BUSY_NOTICE_S:
                    said = True
                    logger.info("Waiting for %s (%s), at most %s", holder, path, duration(round(timeout)))
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def frozen_after() -> float:
    """How long a worker may send no heartbeat before it counts as frozen ($RUNNER_WARM_FROZEN_S)."""
    try:
        value = float(os.environ.get(FROZEN_ENV) or FROZEN_S)
    except ValueError:
        return FROZEN_S
    return value if 0 < value < float("inf") else FROZEN_S


def silent_for(folder: Path, wid: str) -> float:
    """Seconds since the worker's last heartbeat (`<id>.beat` touched); inf without one."""
    try:
        return max(time.time() - os.stat(path_of(folder, wid, "beat")).st_mtime, 0.0)
    except OSError:
        return float("inf")


def is_alive(folder: Path, wid: str) -> bool:
    """Whether the worker `wid` lives: it holds its lock file from start to exit."""
    try:
        fd = os.open(path_of(folder, wid, "lock"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove(folder: Path, wid: str, *exts: str) -> None:
    for ext in exts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path_of(folder, wid, ext))


def read_info(folder: Path, wid: str) -> dict[str, Any]:
    try:
        return json.loads(path_of(folder, wid, "json").read_text())
    except (OSError, ValueError):
        return {}


def write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def workers(folder: Path) -> list[dict[str, Any]]:
    """The workers with a record in `folder`, each with `alive`."""
    found = []
    for info_file in sorted(folder.glob("*.json")):
        info = read_info(folder, info_file.stem)
        if info:
            found.append(info | {"alive": is_alive(folder, info_file.stem)})
    return found


# ------------------------------------------------------------------------- identity


@dataclass
class Identity:
    digest: str  # sha256 of everything a worker must share with the command
    about: dict[str, Any]  # what it holds, for the logs and `warm status` (no environment values)

    @property
    def wid(self) -> str:
        return self.digest[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The runner's and the library's sources, by path and stat (size, times, inode)."""
    import pipelines

    h = hashlib.sha256()
    for root in (Path(__file__).resolve().parents[2], Path(pipelines.__file__).resolve().parent):
        for path in sorted(root.rglob("*.py")):
            h.update(f"{path}:{stat_key(path.stat())}\n".encode())
    return h.hexdigest()


def identity(plan: Any) -> Identity:
    """Which worker may run this job: everything it must share with the command (docs/warm.md)."""
    spec, rt = plan.spec, plan.runtime
    env = {k: v for k, v in os.environ.items() if k.startswith(IDENTITY_ENV)}
    whole = {"cache_key": build.cache_key(spec, rt), "python": sys.executable, "code": code_fingerprint(),
             "cwd": os.getcwd(), "env": env}
    digest = hashlib.sha256(json.dumps(whole, sort_keys=True, default=str).encode()).hexdigest()
    device = rt.device
    if device.startswith("cuda"):  # the physical device: cuda == cuda:0, under CUDA_VISIBLE_DEVICES
        device = f"{device if ':' in device else device + ':0'}@{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    about = {"model": spec.model.name, "vram": spec.vram.name, "dtype": rt.dtype, "device": rt.device,
             "device_key": device, "cwd": os.getcwd()}
    return Identity(digest, about)


def describe(about: dict[str, Any]) -> str:
    return f"{about.get('model')} ({about.get('device')}, {about.get('dtype')}, vram={about.get('vram')})"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# ---------------------------------------------------------------- stopping workers


def terminate(folder: Path, info: dict[str, Any], wait: float = STOP_WAIT_S) -> bool:
    """SIGTERM to a worker (an idle one exits at once, a busy one after its job); True once it
    has exited within `wait` seconds. Only a pid whose start time matches its record."""
    wid, pid = info.get("wid", ""), info.get("pid")
    if not wid or not is_alive(folder, wid):
        return True
    if not isinstance(pid, int) or process_start(pid) != info.get("start"):
        logger.warning("Warm worker %s: its record does not match a live process; not signalled", wid)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while is_alive(folder, wid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill(folder: Path, info: dict[str, Any]) -> bool:
    """SIGKILL to a frozen worker (a stopped one cannot handle SIGTERM), only a pid whose start
    time matches its record; True once it has exited (within STOP_WAIT_S)."""
    wid, pid = info.get("wid", ""), info.get("pid")
    if not isinstance(pid, int) or process_start(pid) != info.get("start"):
        return False
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_WAIT_S
    while is_alive(folder, wid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(folder, wid):
        return False
    remove(folder, wid, "sock", "json", "beat")  # what it cannot clean itself: the next command starts anew
    return True


def stop_others(folder: Path, ident: Identity) -> None:
    """One warm worker per device: stop the others on this device."""
    for info in workers(folder):
        if not info["alive"] or info.get("wid") == ident.wid:
            continue
        if info.get("about", {}).get("device_key") != ident.about["device_key"]:
            continue
        logger.info("Stopping warm worker pid %s (%s): one warm worker per device", info.get("pid"),
                    describe(info.get("about", {})))
        if not terminate(folder, info):
            logger.warning("Warm worker pid %s is still busy with a job: the new one loads beside it",
                           info.get("pid"))


def status_lines(folder: Path) -> list[str]:
    lines = []
    for info in workers(folder):
        if not info["alive"]:
            continue
        about = info.get("about", {})
        left = info.get("last_used", 0) + info.get("keep_warm_s", 0) - time.time()
        lines.append(f"pid {info.get('pid')}  {describe(about)}  loads {info.get('loads')}  jobs {info.get('jobs')}  "
                     f"exits in {duration(max(round(left), 0))} without a command  (cwd {about.get('cwd')})")
    return lines


def stop_all(folder: Path, wait: float = STOP_WAIT_S) -> int:
    """Stop every warm worker in `folder` (a busy one after its job); remove what dead ones
    left. Returns how many did not exit within `wait`."""
    left = 0
    for info in workers(folder):
        wid = info.get("wid", "")
        if info["alive"]:
            print(f"stopping warm worker pid {info.get('pid')} ({describe(info.get('about', {}))})", flush=True)
            if not terminate(folder, info, wait):
                print(f"  pid {info.get('pid')} is still busy after {wait:g} s: it exits after its job")
                left += 1
                continue
        remove(folder, wid, "sock", "json", "beat")
    return left


def take_lock(path: Path) -> Optional[int]:
    """This worker's lock, held until it exits; a previous worker may still be exiting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.02)


def record_in_folder(plan: Any) -> Optional[Any]:
    """The finished record of this very job in its folder (job.json), if there is one."""
    if plan.job_dir is None:
        return None
    try:
        record = JobRecord.read(Path(plan.job_dir) / "job.json")
    except (OSError, ValueError, TypeError):
        return None
    if record.record_id == plan.record_id and record.status in (FINISHED, FAILED, KILLED):
        return record
    return None


